#!/usr/bin/env bash
# One unattended job on a lent GPU box whose copy of the checkout every call overwrites: unpacks --tree (a
# `git archive` of the commit to run, so benchmarks/archive_commit.txt names it; default .gpu/tree.tgz) into
# <--store>/repo and runs benchmarks/quality_job.sh there with --store and the arguments after `--`.
# Usage (repo root; the box prepared by benchmarks/device_setup.sh):
#   git archive --format=tar.gz -o .gpu/tree.tgz HEAD        # here, before the call that carries .gpu
#   setsid nohup bash benchmarks/lease_job.sh --store /root/store -- --phases family --family-arms dflash --alone \
#     > /root/store/job.out 2>&1 < /dev/null &
# then, in each following call, at once (an idle box is taken back within seconds):
#   bash benchmarks/lease_poll.sh --store /root/store --wait 420 --out "$OUT"
set -u
STORE=/root/store TREE=.gpu/tree.tgz
OPTIONS=(store tree)
source "$(dirname "$0")/flags.sh"
parse_flags "$@"
[ -f "$TREE" ] || { echo "lease_job.sh: no tree archive at $TREE" >&2; exit 2; }
mkdir -p "$STORE"
STORE=$(realpath "$STORE")
rm -rf "$STORE/repo" && mkdir -p "$STORE/repo" && tar -xzf "$TREE" -C "$STORE/repo"
cd "$STORE/repo" && exec bash benchmarks/quality_job.sh --store "$STORE" "${ARGS[@]}"
