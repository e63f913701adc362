#!/usr/bin/env bash
# Resident memory of all relay processes with 0 and with 10,000 idle connections, and the
# user-space bytes per connection (issue 4: target at most 1 KiB, stretch 512 B; the seed
# design used 16 KB). Options as for scale.sh, e.g. --conns 20000 --fronts 2 --procs 2.
exec "$(dirname "$0")/scale.sh" --memory "$@"
