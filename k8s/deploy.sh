#!/usr/bin/env bash
# The whole accresnet chain on the cluster kubectl points at, one step after the
# other, each waited for:
#
#   k8s/deploy.sh [--from STEP] [OVERLAY]      OVERLAY: a kustomization folder (default k8s/overlays/local)
#
# A step applies the overlay's objects its label selector picks
# (kubectl apply -k OVERLAY -l SELECTOR) and waits until what it started is
# done: a Job complete, a TFJob succeeded, a Deployment rolled out, an
# InferenceService Ready. A Job or TFJob that fails stops the chain at once,
# with its last events and log lines. Objects already applied and finished
# are left as they are, so running it again after a fix goes on where it
# stopped; --from starts at a later step (e.g. --from training for the next
# model, once the old Jobs are deleted). docs/deployment.md explains each step.
set -euo pipefail

# The steps, in order: name, how long to wait, label selector. Everything the
# later steps need first (the namespace, the volume, the network policies)
# belongs to the first one. The local harnesses run these same steps
# (tests/manifests.py reads them from here).
STEPS=(
  "data      1h   app.kubernetes.io/component!=trainer,app.kubernetes.io/component!=release,app.kubernetes.io/component!=model-server,app.kubernetes.io/component!=client"
  "training  48h  app.kubernetes.io/component=trainer"
  "release   1h   app.kubernetes.io/component=release"
  "serving   15m  app.kubernetes.io/component=model-server"
  "client    15m  app.kubernetes.io/component=client"
)
NAMESPACE=${ACCRESNET_NAMESPACE:-accresnet}
POLL=${ACCRESNET_POLL:-10s}  # how often a failed Job is looked for while waiting

usage() {
  echo "usage: $0 [--from STEP] [OVERLAY]   (steps: data training release serving client)" >&2
  exit 2
}

from=data
overlay=
while (($#)); do
  case $1 in
    --from) (($# >= 2)) || usage; from=$2; shift 2 ;;
    --from=*) from=${1#--from=}; shift ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [[ -z $overlay ]] || usage; overlay=$1; shift ;;
  esac
done
overlay=${overlay:-$(dirname "$0")/overlays/local}
[[ -f $overlay/kustomization.yaml ]] || { echo "$0: $overlay holds no kustomization.yaml" >&2; exit 2; }
names=" $(for step in "${STEPS[@]}"; do read -r name _ <<<"$step"; printf '%s ' "$name"; done)"
[[ $names == *" $from "* ]] || { echo "$0: no step $from; the steps are:$names" >&2; exit 2; }

seconds() {  # a kubectl duration (90s, 15m, 1h) in seconds
  local value=${1%[smh]}
  case $1 in *h) echo $((value * 3600)) ;; *m) echo $((value * 60)) ;; *) echo "$value" ;; esac
}

failed() {  # object: says why it failed, on stderr
  echo "$0: $1 failed. Its last events and log lines:" >&2
  kubectl -n "$NAMESPACE" describe "$1" 2>&1 | tail -n 15 >&2 || true
  kubectl -n "$NAMESPACE" logs "$1" --all-containers --tail=30 >&2 || true
  echo "$0: fix the cause, delete it (kubectl -n $NAMESPACE delete $1) and run again: $0 --from $step_name $overlay" >&2
  exit 1
}

until_condition() {  # object, the condition it succeeds with, the one it fails with, timeout
  local deadline=$(($(date +%s) + $(seconds "$4")))
  until kubectl -n "$NAMESPACE" wait --for="condition=$2" "$1" --timeout="$POLL" >/dev/null 2>&1; do
    if kubectl -n "$NAMESPACE" wait --for="condition=$3" "$1" --timeout=0 >/dev/null 2>&1; then
      failed "$1"
    fi
    if (($(date +%s) >= deadline)); then
      echo "$0: $1 did not finish within $4" >&2
      exit 1
    fi
  done
}

wait_for() {  # an object as `kubectl apply -o name` prints it, timeout
  echo "    waiting for $1 (at most $2)"
  case ${1%%/*} in
    job.batch) until_condition "$1" complete failed "$2" ;;
    tfjob.kubeflow.org) until_condition "$1" Succeeded Failed "$2" ;;
    deployment.apps) kubectl -n "$NAMESPACE" rollout status "$1" --timeout="$2" ;;
    inferenceservice.serving.kserve.io) kubectl -n "$NAMESPACE" wait --for=condition=Ready "$1" --timeout="$2" ;;
  esac
}

# Before anything starts: every object of the overlay must be of a kind the cluster knows
# (a missing operator's CRD, e.g. the PodMonitor's, would otherwise fail a step hours in).
echo "==> checking $overlay against the cluster's APIs (kubectl apply --dry-run=client)"
if ! kubectl apply -k "$overlay" --dry-run=client -o name >/dev/null; then
  echo "$0: the cluster cannot take $overlay (above); install what it needs (docs/deployment.md, Prerequisites)" >&2
  exit 1
fi

started=
number=0
for step in "${STEPS[@]}"; do
  read -r step_name timeout selector <<<"$step"
  number=$((number + 1))
  [[ $step_name == "$from" ]] && started=yes
  [[ -n $started ]] || continue
  echo "==> step $number/${#STEPS[@]}, $step_name: kubectl apply -k $overlay -l '$selector'"
  applied=$(kubectl apply -k "$overlay" -l "$selector" -o name)
  printf '%s\n' "$applied" | sed 's/^/    /'
  for object in $applied; do
    wait_for "$object" "$timeout"
  done
  if [[ $step_name == client ]]; then
    for object in $applied; do
      if [[ $object == job.batch/* ]]; then
        kubectl -n "$NAMESPACE" logs "$object"
      fi
    done
  fi
done
echo "==> done: kubectl -n $NAMESPACE get pods"
