#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice: the same command on every worker.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b experiments/launch/tpu_pod.sh \
#       --config=experiments/configs/cifar10.py --workdir=gs://my-bucket/runs/cifar10
#
# `gcloud ... ssh --worker=all` starts one attnflax process per TPU VM host; JAX
# detects the TPU slice and jax.distributed.initialize() joins the hosts by itself.
# The workdir must be shared (a gs:// bucket or a mounted file system) because all
# hosts write the Orbax checkpoint together. Run `setup` once to copy the repo and
# install it on every worker:  experiments/launch/tpu_pod.sh setup
# Needs: the gcloud CLI authenticated for the project, a TPU VM slice named
# $TPU_NAME in $ZONE, and REPO_URL (or the repo copied to ~/attnflax on workers).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
remote() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}
if [[ "${1:-}" == "setup" ]]; then
  : "${REPO_URL:?set REPO_URL to clone the repo on every worker}"
  remote "git clone $REPO_URL ~/attnflax 2>/dev/null || git -C ~/attnflax pull;
          cd ~/attnflax && make venv && .venv/bin/pip install -c constraints.txt -e '.[tpu]'"
  exit 0
fi
args=$(printf ' %q' "${@:---config=experiments/configs/cifar10.py}")
remote "cd ~/attnflax && TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m attnflax.main$args"
