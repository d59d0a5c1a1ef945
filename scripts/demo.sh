#!/usr/bin/env bash
# densedet end to end on a fresh machine, CPU only (about 15 minutes on 2 cores):
#   environment (.venv) -> synthetic dataset -> train YOLOX-Nano (writes the loss plot)
#   -> evaluate -> predict -> a picture of what each assigner decides.
# Every knob is a variable below; override from the environment, e.g.
#   EPOCHS=5 IMAGES=200 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# ----------------------------------------------------------------------------- knobs
IMAGES=${IMAGES:-2000}         # synthetic images (80 % train, 10 % val, 10 % test)
IMAGE_SIZE=${IMAGE_SIZE:-320}  # side of the generated images (px)
INPUT_SIZE=${INPUT_SIZE:-256}  # network input (multiple of 32)
EPOCHS=${EPOCHS:-16}           # 1600 train images / 16 = 100 iterations per epoch
NO_AUG_EPOCHS=${NO_AUG_EPOCHS:-3}   # last epochs without mosaic, with YOLOX's L1 term
WARMUP_EPOCHS=${WARMUP_EPOCHS:-1}
BATCH=${BATCH:-16}
LR=${LR:-0.08}                 # per 64 images (scaled by BATCH/64); above YOLOX's 0.01: a short run
EVAL_INTERVAL=${EVAL_INTERVAL:-4}
SCORE_THRESH=${SCORE_THRESH:-0.001}  # evaluation score floor (COCO practice); the pictures use 0.15
WORKERS=${WORKERS:-1}          # data loader processes (the 2 cores also train)
# YOLOX-Nano's depth and width with regular 3x3 convs in the backbone and neck and the
# published depthwise separable ones in the head: on a CPU a depthwise conv is memory-bound,
# so regular convs learn far more per second, and the stride-8 head convs are the one place
# where regular convs cost more than they bring (docs/benchmarks.md: 1.34-1.39x YOLOv8n's training
# speed and a higher mAP at equal wall clock). "{}" trains the published YOLOX-Nano.
MODEL_PARAMS=${MODEL_PARAMS:-"{depthwise: false, head_depthwise: true}"}
# TAL instead of the preset's SimOTA (YOLOX head and losses unchanged): in a 15-minute budget
# it lifted the all-regular-conv Nano from 30.6 to 37.4 % mAP50-95 (docs/benchmarks.md). ASSIGNER=simota
# trains the preset's own.
ASSIGNER=${ASSIGNER:-tal}
EXTRA=${EXTRA:-}               # more key=value overrides, e.g. EXTRA="augment.mosaic_prob=0.2"
CONFIG=${CONFIG:-configs/yolox_nano.yaml}
DATA=${DATA:-data/synth}
OUT=${OUT:-runs/demo}
SEED=${SEED:-0}
PIP_INSTALL=${PIP_INSTALL:-1}  # 0: use the current environment as it is (no .venv, no install)

export CI=${CI:-true}          # plain log lines instead of progress bars in the demo's output

# ----------------------------------------------------------------------------- steps
if [ "$PIP_INSTALL" = "1" ]; then
  EXTRAS= source scripts/venv.sh
fi

echo "== synthetic dataset: $IMAGES images of ${IMAGE_SIZE}px in $DATA"
densedet synth "$DATA" --images "$IMAGES" --size "$IMAGE_SIZE" --seed "$SEED" --force

echo "== train $CONFIG for $EPOCHS epochs at ${INPUT_SIZE}px -> $OUT"
start=$(date +%s)
densedet train "$CONFIG" --force \
  data.root="$DATA" output_dir="$OUT" input_size="$INPUT_SIZE" \
  train.epochs="$EPOCHS" train.no_aug_epochs="$NO_AUG_EPOCHS" train.warmup_epochs="$WARMUP_EPOCHS" \
  train.batch_size="$BATCH" train.lr="$LR" train.eval_interval="$EVAL_INTERVAL" \
  train.seed="$SEED" train.log_interval=10 data.num_workers="$WORKERS" \
  eval.score_thresh="$SCORE_THRESH" model.params="$MODEL_PARAMS" assigner.name="$ASSIGNER" $EXTRA
echo "training took $(( $(date +%s) - start )) s"

echo "== evaluate $OUT/best.pt on the val split"
densedet eval --weights "$OUT/best.pt" --split val --json "$OUT/eval_val.json" --pr-plot "$OUT/pr_curves.png" data.root="$DATA"

echo "== predict on a few val images -> $OUT/predictions/"
mapfile -t stems < <(head -n 6 "$DATA/ImageSets/Main/val.txt")
images=()
for s in "${stems[@]}"; do images+=("$DATA/JPEGImages/$s.jpg"); done
densedet predict --weights "$OUT/best.pt" "${images[@]}" --out "$OUT/predictions" --score-thresh 0.15

# the image: the split's one with several objects of the most different sizes
echo "== assignment picture (trained model's predictions) -> $OUT/assignments.png"
densedet assign-viz "$CONFIG" data.root="$DATA" input_size="$INPUT_SIZE" model.params="$MODEL_PARAMS" \
  --weights "$OUT/best.pt" --out "$OUT/assignments.png"

echo "== done: $OUT/{best.pt,metrics.json,log.csv,loss.png,predictions/}"
python - "$OUT/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
t = m.get("train", {})
fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
print(f"best epoch {t.get('best_epoch')}: AP {fmt(m.get('AP'))}  AP50 {fmt(m.get('AP50'))}  "
      f"VOC mAP50 {fmt(m.get('VOC_mAP50'))}  ({t.get('train_seconds')} s, "
      f"{t.get('train_images_per_second')} img/s)")
EOF
