#!/bin/bash
# The script that trained the shipped models on a GPU machine (one NVIDIA
# H100, 16 CPUs, no network; see README.md here): simulate the training set,
# then fine-tune the 3-band and the 1-band model concurrently (Keras on JAX),
# all within END seconds. Run from the repository root with python3 holding
# jax[cuda], keras, galsim, astropy, scipy, h5py (on that machine, the
# missing ones came as wheels unpacked from .devsite/site.tar.xz), and with
# .devsite/{sim,train3,train1}.json = data/unet_psf_ipsf_ipsf1/
# simulation_overrides.json, data/*/train_config.json with the planned
# "epochs": 200 and "initial_weights" the previous models' files.
# Args: N_OBJECTS END_SECONDS
N=${1:-117000}; END=${2:-545}; PY=${PY:-python3}
OUT=${OUT:-/tmp/devout}; mkdir -p $OUT /tmp/site
t0=$(date +%s)
[ -f /tmp/site/.done ] || { tar xJf .devsite/site.tar.xz -C /tmp/site && touch /tmp/site/.done; }
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 \
       XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 TF_CPP_MIN_LOG_LEVEL=2
[ -n "$LOCALTEST" ] && export PYTHONPATH=$PWD
nvidia-smi -L 2>/dev/null; nproc; free -g | head -2; df -h . /tmp | tail -2
$PY -c "import jax, keras, galsim, astropy, scipy, numpy, h5py; print(jax.devices(), keras.__version__, galsim.__version__, numpy.__version__, scipy.__version__, astropy.__version__)" || exit 9
CLI="from psfdeconv.cli import main; main()"
SIM=$PWD/.devsite/train.h5
$PY -c "$CLI" simulate --n $N --seed 5 --config .devsite/sim.json --out $SIM --overwrite 2>&1 | tail -2
el=$(( $(date +%s) - t0 )); echo "sim done $el s"
# Leave 110 s for building the caches, compiling and saving.
MIN=$($PY -c "print(round(max(0.5, ($END - $el - 110) / 60), 2))"); echo "training minutes $MIN"
for m in 3 1; do
  sed "s/\"max_minutes\": [0-9.]*/\"max_minutes\": $MIN/" .devsite/train$m.json > /tmp/train$m.json
  name=unet_psf_ipsf_ipsf1; [ $m = 1 ] && name=unet1_psf_ipsf_ipsf1
  ( $PY -c "$CLI" train $SIM --out /tmp/m$m --name $name --config /tmp/train$m.json > $OUT/train$m.log 2>&1;
    cp /tmp/m$m/$name.keras /tmp/m$m/$name.json $OUT/ ; cp /tmp/m$m/state.json $OUT/state$m.json ) &
done
wait
echo "all done $(( $(date +%s) - t0 )) s"; ls -la $OUT; tail -n 5 $OUT/train3.log; tail -n 5 $OUT/train1.log
