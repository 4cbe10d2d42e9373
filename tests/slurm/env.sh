# Shared settings of the local test cluster; sourced by setup.sh, teardown.sh and run.sh.
# Config, state, logs and the munge key live under one state directory. Only
# /etc/slurm/{slurm,gres}.conf are symlinks into it: the Snakemake jobstep plugin drops
# SLURM_CONF from the environment of its inner srun, so the config must be at the default path.
export EAGLEPIPE_SLURM_DIR="${EAGLEPIPE_SLURM_DIR:-/tmp/eaglepipe-slurm}"
SLURM_ETC=/etc/slurm
GENERATED_CONF="$EAGLEPIPE_SLURM_DIR/etc/slurm.conf"
unset SLURM_CONF
export EAGLEPIPE_SLURM_CTLD_PORT="${EAGLEPIPE_SLURM_CTLD_PORT:-6817}"
export EAGLEPIPE_SLURM_SLURMD_PORT="${EAGLEPIPE_SLURM_SLURMD_PORT:-6818}"
MUNGE_DIR="$EAGLEPIPE_SLURM_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
