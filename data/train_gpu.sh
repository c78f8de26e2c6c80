#!/bin/bash
# Train the 3-band and the 1-band model concurrently on one GPU machine (no
# network) within END seconds, then leave their checkpoints in $OUT for a
# CPU finish (`psfdeconv train --resume`, which calibrates the card).
#
# Run from the repository root with python3 holding jax[cuda], numpy, scipy
# and h5py; keras, galsim, astropy and photutils come from
# .devsite/site.tar.xz (wheels for that machine's Python, unpacked with
# `pip install --target`). Inputs: .devsite/sim.json (the `psfdeconv simulate
# --config` file) and .devsite/train3.json, .devsite/train1.json (the
# `psfdeconv train --config` files, "max_minutes" replaced here to fit END).
# The calibration is left to the finish: inside one 10-minute call it would
# not fit beside the training.
#
# Making .devsite/site.tar.xz here (Python 3.12 wheels, GalSim's library stripped
# and its Roman/sensor data left out to stay under the 64 MiB transfer limit):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d whl \
#     keras==3.15.1 namex optree GalSim==2.8.5 LSSTDESC.Coord astropy pyerfa astropy-iers-data photutils
#   pip install --no-deps --target site --python-version 3.12 --implementation cp \
#     --only-binary=:all: whl/*.whl
#   strip --strip-unneeded site/galsim/*.so; rm -r site/galsim/share/{roman,sensors} site/galsim/include
#   tar cJf .devsite/site.tar.xz -C site .
#
# Args: N_OBJECTS SEED END_SECONDS.  LOCALTEST=1 runs with this machine's
# Python path instead of the unpacked site (a smoke test of the recipe).
# MODELS="3" trains the 3-band model alone (e.g. a distillation of its
# symmetry average, data/README.md).
N=${1:-117000}; SEED=${2:-7}; END=${3:-520}; PY=${PY:-python3}; MODELS=${MODELS:-3 1}
OUT=${OUT:-/tmp/devout}; mkdir -p "$OUT" /tmp/site
t0=$(date +%s)
if [ -z "$LOCALTEST" ]; then
  [ -f /tmp/site/.done ] || { tar xJf .devsite/site.tar.xz -C /tmp/site && touch /tmp/site/.done; }
  export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi -L 2>/dev/null; nproc; free -g | head -2
$PY -c "import keras, galsim, astropy, scipy, numpy, h5py; print(keras.backend.backend(), keras.__version__, galsim.__version__, numpy.__version__, scipy.__version__, astropy.__version__)" || exit 9
SIM=/tmp/train.h5
$PY -c "from psfdeconv.cli import main; main()" simulate --n "$N" --seed "$SEED" \
    --config .devsite/sim.json --out $SIM --overwrite 2>&1 | tail -2
el=$(( $(date +%s) - t0 )); echo "simulation done at $el s"
# Leave 100 s for the input cubes, compiling and the last checkpoint.
MIN=$($PY -c "print(round(max(0.3, ($END - $el - 100) / 60), 2))"); echo "training minutes $MIN"
TRAIN='import json, sys
from psfdeconv.train import TrainConfig, train_model
values = json.load(open(sys.argv[1])); values["max_minutes"] = float(sys.argv[3])
train_model(sys.argv[2], sys.argv[4], config=TrainConfig.from_dict(values), verbose=2)'
for m in $MODELS; do
  ( $PY -c "$TRAIN" .devsite/train$m.json $SIM "$MIN" /tmp/m$m > "$OUT/train$m.log" 2>&1
    # Files come back in parts of at most 15 MB.
    tar cf /tmp/m$m.tar -C /tmp/m$m best.keras state.json && split -b 15M /tmp/m$m.tar "$OUT/m$m.tar.part-" ) &
done
wait
echo "all done at $(( $(date +%s) - t0 )) s"; ls -la "$OUT"; for m in $MODELS; do tail -n 4 "$OUT/train$m.log"; done
