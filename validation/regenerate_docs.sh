#!/usr/bin/env bash
# Regenerate every measured page of the docs that comes from simulations with truth:
# the stamp-level reports (docs/report, docs/report_1band) with the shapes' information
# floor (docs/report/information_floor*), the input ablation
# (docs/ablation), the plots of docs/plotting.rst and the two model cards, from the shipped
# models.
#
#     bash validation/regenerate_docs.sh TRAIN.h5 TEST.h5 [RUNS]
#
# TRAIN.h5: the shipped model's training set, TEST.h5: the held-out test set, made with
#     psfdeconv simulate --n 117000 --seed 5 --config data/unet_psf_ipsf_ipsf1/simulation_overrides.json --out TRAIN.h5
#     psfdeconv simulate --n 3000 --seed 4 --config test_overrides.json --out TEST.h5
# (test_overrides.json: the same overrides without psf_families; docs/validation.rst).
# RUNS: where the ablation's 7 training runs go (default: ablation_runs/; resumable).
# About two hours on 2 CPU cores, most of it the ablation's trainings. The exposure-level
# figures come from validation/exposure_accuracy.py, which simulates its own field.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
train=${1:?give the training simulation file}
test=${2:?give the held-out test simulation file}
runs=${3:-ablation_runs}

psfdeconv evaluate "$test" --n 2000 --baselines observed,wiener,richardson_lucy \
    --report docs/report --plots --overwrite
psfdeconv evaluate "$test" --model psfdeconv/data/unet1_psf_ipsf_ipsf1.keras --n 700 \
    --baselines observed,wiener --report docs/report_1band --overwrite
python validation/information_floor.py "$test" --n 2000 --out docs/report --overwrite
python validation/information_floor.py "$test" --n 2000 --target-fwhm 0.5 --out docs/report \
    --overwrite
python validation/information_floor.py "$test" --n 2000 --target-fwhm 0.5 --no-target-update \
    --out docs/report --overwrite
python validation/ablation.py "$train" "$test" --out docs/ablation --runs "$runs" \
    --n-train 16000 --epochs 2 --n-test 1000
python docs/make_plots.py --overwrite
python docs/make_model_card.py psfdeconv/data/unet_psf_ipsf_ipsf1.json docs/report \
    docs/model_card.rst
python docs/make_model_card.py psfdeconv/data/unet1_psf_ipsf_ipsf1.json docs/report_1band \
    docs/model_card_1band.rst
