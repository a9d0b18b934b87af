#!/usr/bin/env bash
# Trains ddpm_jax on a Cloud TPU VM slice (one worker or a pod slice such as v3-32) with gcloud.
#
#   launch/tpu_pod.sh all --name ddpm --zone europe-west4-a --accelerator v3-32 \
#       --config configs/cifar10.py --workdir gs://BUCKET/ddpm_cifar10 \
#       --data-dir gs://BUCKET/tensorflow_datasets -- --config.training.batch_size=256
#
# Run `launch/tpu_pod.sh --help` for the steps and options, and `--dry-run` to print the
# commands instead of running them.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="launch/tpu_pod.sh"

usage() {
  cat <<EOF
Usage: $PROG [OPTIONS] STEP... [-- MAIN_FLAGS...]

Trains ddpm_jax on a Cloud TPU VM slice. Each STEP runs in the order given:
  create   create the slice (gcloud compute tpus tpu-vm create)
  setup    copy the code to every worker and pip install -e '.[tpu]' there
  train    start 'python3 -m ddpm_jax.main' on every worker under nohup, logging to
           REMOTE_DIR/train.log on each worker; returns once all workers have started
  logs     follow worker 0's log until training ends; exits with the training's status
  stop     send SIGTERM to the training on every worker: it saves a checkpoint and exits
  delete   delete the slice
  all      create setup train logs delete (delete is skipped with --keep)

Rerunning 'train' (or 'all' after 'delete') with the same --workdir resumes from the latest
checkpoint. A preempted spot slice must be deleted before it is created again.

Options:
  --name NAME           slice name: lowercase letters, digits and '-' (required)
  --zone ZONE           e.g. europe-west4-a (required)
  --project PROJECT     GCP project (default: gcloud's core/project)
  --accelerator TYPE    e.g. v3-8, v3-32, v4-32 (required by create)
  --version RUNTIME     TPU VM runtime (default: $VERSION); v5e wants
                        v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
  --spot                create a spot slice (can be preempted at any time)
  --preemptible         create a preemptible slice (older TPU types)
  --config FILE         config inside the repository, e.g. configs/cifar10.py (required by train)
  --workdir DIR         gs://BUCKET/PATH shared by all workers (required by train)
  --data-dir DIR        TFDS data dir, e.g. gs://BUCKET/tensorflow_datasets; passed on as
                        --config.data.data_dir
  --mode MODE           ddpm_jax.main's --mode: train, sample, eval or figures (default: train)
  --repo URL            git clone URL on the workers (default: copy this checkout with scp)
  --branch BRANCH       branch or tag of --repo (default: its default branch)
  --remote-dir DIR      code directory on the workers, relative to home (default: $REMOTE_DIR)
  --keep                'all' leaves the slice running at the end
  --dry-run             print each command, fully quoted, one per line, instead of running it
  -h, --help            show this help

MAIN_FLAGS after '--' go to ddpm_jax.main unchanged, e.g. --config.training.batch_size=256.
The workers need read/write access to the bucket (the slice's service account does by default
within its project).
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# Prints its argument as one shell word: bare when it is plainly safe, else single-quoted
# (only the value of a --flag=value, for readability).
quote() {
  local s=$1 flag=""
  if [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    flag=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$flag" "$s"
  else
    printf "%s'%s'" "$flag" "${s//\'/\'\\\'\'}"
  fi
}

# Prints its arguments as one shell command line.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run. Real runs echo it to stderr first.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

# ------------------------------------------------------------------------------ arguments

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base" CAPACITY=""
CONFIG="" WORKDIR="" DATA_DIR="" MODE="train" REPO_URL="" BRANCH="" REMOTE_DIR="ddpm_jax"
KEEP=0 DRY_RUN=0 TARBALL=""
STEPS=()
MAIN_FLAGS=()

parse_args() {
  local opt value
  while (($#)); do
    opt=$1
    case $opt in
      --) shift; MAIN_FLAGS=("$@"); return ;;
      -h | --help) usage; exit 0 ;;
      --keep) KEEP=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot | --preemptible)
        [[ -z $CAPACITY || $CAPACITY == "$opt" ]] || die "--spot and --preemptible exclude each other"
        CAPACITY=$opt ;;
      --*=*) value=${opt#*=}; set_option "${opt%%=*}" "$value" ;;
      --*)
        if (($# < 2)) || [[ $2 == --* ]]; then die "$opt needs a value"; fi
        set_option "$opt" "$2"
        shift ;;
      create | setup | train | logs | stop | delete) STEPS+=("$opt") ;;
      all) STEPS+=(create setup train logs delete-unless-keep) ;;
      *) die "unknown step '$opt' (expected create, setup, train, logs, stop, delete or all)" ;;
    esac
    shift
  done
}

set_option() {
  local opt=$1 value=$2
  [[ -n $value ]] || die "$opt needs a non-empty value"
  case $opt in
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator | --accelerator-type) ACCELERATOR=$value ;;
    --version) VERSION=$value ;;
    --config) CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
    --data-dir) DATA_DIR=$value ;;
    --mode) MODE=$value ;;
    --repo) REPO_URL=$value ;;
    --branch) BRANCH=$value ;;
    --remote-dir) REMOTE_DIR=$value ;;
    *) die "unknown option '$opt'" ;;
  esac
}

has_step() {
  local step
  for step in "${STEPS[@]}"; do
    [[ $step == "$1" ]] && return 0
  done
  return 1
}

validate_args() {
  ((${#STEPS[@]})) || die "no step given (create, setup, train, logs, stop, delete or all)"
  [[ -n $NAME ]] || die "--name is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$NAME' must be lowercase letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die "--zone is required"
  if has_step create; then
    [[ -n $ACCELERATOR ]] || die "--accelerator is required to create a slice (e.g. v3-32)"
  fi
  if has_step train; then
    [[ -n $CONFIG ]] || die "--config is required to train (e.g. configs/cifar10.py)"
    [[ -n $WORKDIR ]] || die "--workdir is required to train (e.g. gs://BUCKET/ddpm_cifar10)"
    case $MODE in
      train | sample | eval | figures) ;;
      *) die "--mode '$MODE' is not one of train, sample, eval, figures" ;;
    esac
    if [[ -z $REPO_URL && ($CONFIG == /* || ! -f $REPO_ROOT/$CONFIG) ]]; then
      die "--config '$CONFIG' is not a file inside $REPO_ROOT (give it relative to the repository, e.g. configs/cifar10.py)"
    fi
    if [[ $WORKDIR != gs://* ]]; then
      printf '%s: warning: --workdir %s is not on GCS; the workers of a pod slice do not share local disks\n' \
        "$PROG" "$WORKDIR" >&2
    fi
  fi
  [[ -z $BRANCH || -n $REPO_URL ]] || die "--branch needs --repo"
  [[ $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] ||
    die "--remote-dir '$REMOTE_DIR' must be a path relative to the home directory"
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}

# ------------------------------------------------------------------------------ the steps

gcloud_tpu() {  # gcloud compute tpus tpu-vm VERB [NAME] --zone=ZONE [--project=P] ARGS...
  local verb=$1
  shift
  local cmd=(gcloud compute tpus tpu-vm "$verb")
  [[ $verb == scp ]] || cmd+=("$NAME")  # scp names the slice in its NAME:PATH arguments.
  cmd+=("--zone=$ZONE")
  [[ -z $PROJECT ]] || cmd+=("--project=$PROJECT")
  run "${cmd[@]}" "$@"
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND: runs a shell command line on the worker(s).
  gcloud_tpu ssh "--worker=$1" "--command=$2"
}

step_create() {
  local flags=("--accelerator-type=$ACCELERATOR" "--version=$VERSION")
  [[ -z $CAPACITY ]] || flags+=("$CAPACITY")
  gcloud_tpu create "${flags[@]}"
}

step_setup() {
  local dir install fetch
  dir=$(quote "$REMOTE_DIR")
  install="cd $dir && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'"
  if [[ -n $REPO_URL ]]; then
    local url ref clone=(git clone --depth=1)
    url=$(quote "$REPO_URL")
    ref=$(quote "${BRANCH:-HEAD}")
    [[ -z $BRANCH ]] || clone+=("--branch=$BRANCH")
    fetch="if [ -d $dir/.git ]; then git -C $dir fetch -q --depth=1 $url $ref && git -C $dir checkout -q -f FETCH_HEAD; else $(quote_all "${clone[@]}" "$REPO_URL" "$REMOTE_DIR"); fi"
    on_workers all "$fetch && $install"
  else
    TARBALL="${TMPDIR:-/tmp}/ddpm_jax-$NAME.tar.gz"
    ((DRY_RUN)) || trap 'rm -f "$TARBALL"' EXIT
    run tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=./.ruff_cache \
      --exclude='./workdir*' --exclude='*.egg-info' --exclude=__pycache__ -C "$REPO_ROOT" .
    gcloud_tpu scp "$TARBALL" "$NAME:ddpm_jax_code.tar.gz" "--worker=all"
    on_workers all "mkdir -p $dir && tar -xzf ddpm_jax_code.tar.gz -C $dir && rm ddpm_jax_code.tar.gz && $install"
  fi
}

step_train() {
  local main=(python3 -m ddpm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE")
  [[ -z $DATA_DIR ]] || main+=("--config.data.data_dir=$DATA_DIR")
  main+=("${MAIN_FLAGS[@]}")
  # The wrapper records main's exit status next to its log; `logs` reports it.
  local job
  job="PYTHONUNBUFFERED=1 $(quote_all "${main[@]}") > train.log 2>&1; echo \$? > train.exit"
  on_workers all "cd $(quote "$REMOTE_DIR") || exit 1; \
if [ -f train.pid ] && kill -0 \"\$(cat train.pid)\" 2>/dev/null; then \
echo \"ddpm_jax is still running on \$(hostname); stop it first\" >&2; exit 1; fi; \
rm -f train.exit; nohup bash -c $(quote "$job") > /dev/null 2>&1 < /dev/null & \
echo \$! > train.pid; echo \"started ddpm_jax.main on \$(hostname)\""
}

logs_command() {  # logs_command TAIL_START: the remote command that follows worker 0's log.
  local dir
  dir=$(quote "$REMOTE_DIR")
  # tail --pid stops with the training; ssh's own failures exit 255, so 255 is kept for them.
  printf '%s' "cd $dir || exit 1; \
if [ ! -f train.pid ]; then echo \"no training started in $dir on \$(hostname)\" >&2; exit 1; fi; \
tail -n $1 -F --pid=\"\$(cat train.pid)\" train.log; \
s=\$(cat train.exit 2>/dev/null || echo 1); [ \"\$s\" -ne 255 ] || s=254; \
echo \"ddpm_jax.main exited with status \$s\"; exit \"\$s\""
}

step_logs() {
  local attempt status start="+1"
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    status=0
    on_workers 0 "$(logs_command "$start")" || status=$?
    ((status == 255 && !DRY_RUN)) || return "$status"
    printf '%s: lost the connection to worker 0 (attempt %d of 10); reconnecting in 30 s\n' \
      "$PROG" "$attempt" >&2
    sleep 30
    start=20
  done
  printf '%s: could not reach worker 0; training may still run: %s logs ... to follow it\n' \
    "$PROG" "$PROG" >&2
  return 255
}

step_stop() {
  on_workers all "cd $(quote "$REMOTE_DIR") || exit 1; \
if [ -f train.pid ] && kill -0 \"\$(cat train.pid)\" 2>/dev/null; then \
pkill -TERM -P \"\$(cat train.pid)\"; echo \"sent SIGTERM on \$(hostname)\"; \
else echo \"nothing running on \$(hostname)\"; fi"
}

step_delete() {
  gcloud_tpu delete --quiet
}

main() {
  parse_args "$@"
  validate_args
  local step status=0
  for step in "${STEPS[@]}"; do
    case $step in
      logs)
        # In `all`, the slice is deleted after training whether it succeeded or not (its log
        # was just streamed), unless the connection was lost: then training may still run.
        step_logs || status=$?
        if ((status == 255)); then exit 255; fi ;;
      create) step_create ;;
      setup) step_setup ;;
      train) step_train ;;
      stop) step_stop ;;
      delete) step_delete ;;
      delete-unless-keep) ((KEEP)) || step_delete ;;
    esac
  done
  exit "$status"
}

main "$@"
