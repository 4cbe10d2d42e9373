# step NAME SECONDS CMD...: run CMD under a time limit, its output appended to $LOGS/NAME.log and its start and end
# to $LOGS/steps.txt; returns its exit status, or 0 for a step that $STEPS (names, or "all") does not pick. A name
# ending in _eager is picked with its stem (the retry of a step without its fast paths). Sourced by the GPU jobs.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  case " $STEPS " in *" all "*|*" ${name%_eager} "*) ;; *) return 0 ;; esac
  start=$(date +%s)
  echo "$(date +%T) start $name: $*" >> "$LOGS/steps.txt"
  timeout --signal=INT --kill-after=30 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$(date +%T) end $name rc=$rc after $(( $(date +%s) - start ))s" >> "$LOGS/steps.txt"
  return $rc
}
