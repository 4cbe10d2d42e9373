# parse_flags "$@": the calling script's `--some-name VALUE` options into shell variables (SOME_NAME), for the names
# in OPTIONS (each takes a value) and SWITCHES (no value: the variable becomes 1); other arguments are kept, in
# order, in ARGS, and so is everything after `--`, options included (for a script that hands them on). `--help`
# prints the script's header comment; an unknown option or a missing value stops the script (exit 2). Sourced by
# the GPU jobs, which set their defaults first, so that no environment variable acts as one of their switches.
parse_flags() {
  ARGS=()
  local name var
  while [ $# -gt 0 ]; do
    case $1 in
      --) shift
          ARGS+=("$@")
          break ;;
      -h|--help) sed -n '2,/^set -u/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
      --*) name=${1#--}
           var=$(printf '%s' "$name" | tr 'a-z-' 'A-Z_')
           if [[ " ${SWITCHES[*]-} " == *" $name "* ]]; then
             printf -v "$var" 1
             shift
           elif [[ " ${OPTIONS[*]-} " == *" $name "* ]]; then
             [ $# -ge 2 ] || { echo "$(basename "$0"): $1 needs a value" >&2; exit 2; }
             printf -v "$var" '%s' "$2"
             shift 2
           else
             local known=(${OPTIONS[@]+"${OPTIONS[@]}"} ${SWITCHES[@]+"${SWITCHES[@]}"})
             echo "$(basename "$0"): unknown option $1 (options: ${known[*]/#/--})" >&2
             exit 2
           fi ;;
      *) ARGS+=("$1")
         shift ;;
    esac
  done
}
