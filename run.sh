#!/usr/bin/env bash
# A sweep in the spirit of the FLASC / merging seeds: server optimizers x client optimizers x local
# epochs x merging strategies x seeds, each a train_lora.py run on the embedded default.
#
#   bash run.sh                 # the full sweep (long: 5 x 2 x 2 x 4 x 2 = 160 runs)
#   ROUNDS=4 SEEDS="0" SERVER_OPTS="sgd adam" STRATEGIES="average ties" bash run.sh   # a slice
#   DRY_RUN=1 bash run.sh       # print the commands only
#
# Runs land in $DIR/<server_opt>-<client_opt>-e<epochs>-<strategy>-seed<s>; a folder holding a
# finished run of the same resolved config is skipped, an unfinished one of the same config is
# resumed, anything else there is replaced, so the script can be started again after an interruption.
set -uo pipefail
cd "$(dirname "$0")"

DIR=${DIR:-runs/sweep}
ROUNDS=${ROUNDS:-16}
SEEDS=${SEEDS:-"0 1"}
SERVER_OPTS=${SERVER_OPTS:-"sgd sgdm adam adagrad yogi"}
CLIENT_OPTS=${CLIENT_OPTS:-"sgd adam"}
EPOCHS=${EPOCHS:-"1 2"}
STRATEGIES=${STRATEGIES:-"average task_arithmetic ties dare"}
PYTHON=${PYTHON:-python}

# Server learning rate per server optimizer (tuned on the embedded default, see configs/fed*.yaml):
# SGD-like optimizers move by the update itself, adaptive ones by about lr per coordinate
# (adamw, the FLASC code's, is not in the default sweep: SERVER_OPTS="adamw" adds it).
server_lr() {
  case "$1" in
    sgd) echo 1.0 ;;
    sgdm) echo 0.5 ;;
    adam|yogi|adamw) echo 0.01 ;;
    adagrad) echo 0.03 ;;
  esac
}
# Client learning rate per client optimizer.
client_lr() {
  case "$1" in
    sgd) echo 0.05 ;;
    adam|adagrad|yogi) echo 0.001 ;;
  esac
}

failed=0
for seed in $SEEDS; do
for sopt in $SERVER_OPTS; do
for copt in $CLIENT_OPTS; do
for ep in $EPOCHS; do
for strat in $STRATEGIES; do
  name="${sopt}-${copt}-e${ep}-${strat}-seed${seed}"
  opts=(--server-opt "$sopt" --server-lr "$(server_lr "$sopt")"
        --client-opt "$copt" --client-lr "$(client_lr "$copt")" --client-epochs "$ep"
        --merging-strategy "$strat" --server-rounds "$ROUNDS" --seed "$seed" --dir "$DIR" --name "$name")
  state=$("$PYTHON" run_experiments.py --state-of "$DIR/$name" -- "${opts[@]}")
  case "$state" in
    done) echo "skip $name (finished with this config)"; continue ;;
    resume) cmd=("$PYTHON" train_lora.py --resume "$DIR/$name") ;;
    *) cmd=("$PYTHON" train_lora.py "${opts[@]}") ;;
  esac
  echo "${cmd[*]}"
  if [ -z "${DRY_RUN:-}" ]; then
    [ "$state" = resume ] || rm -rf "${DIR:?}/$name"   # another config's run, or one never checkpointed
    "${cmd[@]}" || { echo "FAILED: $name"; failed=$((failed + 1)); }
  fi
done; done; done; done; done
echo "sweep done; $failed failed"
[ "$failed" -eq 0 ]
