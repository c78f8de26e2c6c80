#!/usr/bin/env python
"""Write docs/model_card.rst from a model card JSON and an evaluation report.

Usage::

    python docs/make_model_card.py psfdeconv/data/unet_psf_ipsf_ipsf1.json docs/report
"""

import json
import sys
from pathlib import Path

from astropy.table import QTable


def _device(training):
    """Where the card says the epochs ran (older cards: the development CPU)."""
    device = training.get('compute_device')
    if not device or device == 'cpu':
        return '2 CPU cores'
    return f'{device} (Keras on {training.get("keras_backend", "?")})'

def _symmetry_line(symmetries):
    """The card's symmetry average, as a bullet."""
    if symmetries == 1:
        return '* one network pass per stamp (no symmetry average)'
    return (f'* output averaged over {symmetries} symmetries of the square '
            f'(`~psfdeconv.deconvolve.symmetric_output`)')


def _section(title, paragraph, none='None.'):
    """Lines of a card section: its title, underlined, and the paragraph,
    or ``none`` where the card has no such entry."""
    return [title, '=' * len(title), '', paragraph or none, '']


def _shear_lines(shear):
    """The card's shear response and its held-out ring-test validation."""
    def ranges(edges, fmt):
        values = [fmt.format(10**x) for x in edges]
        return ([f'< {values[1]}'] + [f'{a}-{b}' for a, b in zip(values[1:-2], values[2:-1],
                                                                   strict=True)]
                + [f'> {values[-2]}'])

    snr = ranges(shear['log_snr_edges'], '{:.0f}')
    size = ranges(shear['log_size_edges'], '{:.2f}')
    lines = [f'Calibrated shear estimates ``{shear["form"]}`` (`~psfdeconv.shear_response.'
             f'shear_estimates`), applied by `~psfdeconv.deconvolve.deconvolve_stamps` '
             f'(details ``shear_g1``, ``shear_g2``, ``shear_R1``, ``shear_R2``) and in the '
             f'catalogue of ``psfdeconv run``. Fitted by '
             f'`~psfdeconv.shear.fit_shear_response` on a ring test of '
             f'{shear["n_galaxies"]} galaxies (seed {shear.get("seed")}, g = '
             f'{shear["shear"]}, kernel sigma {shear["kernel_sigma_pixels"]} pixels); '
             f'c1 = {shear["c1"]:+.5f}, c2 = {shear["c2"]:+.5f}, alpha = '
             f'{shear["alpha"]:+.4f}. R1 / R2 per bin (rows: SNR = flux / '
             f'flux_err, columns: shear_size in pixels):', '']
    header = ['SNR \\ size'] + size
    rows = [[snr[i]] + [f'{a:.3f} / {b:.3f}' for a, b in zip(r1, r2, strict=True)]
            for i, (r1, r2) in enumerate(zip(shear['R1'], shear['R2'], strict=True))]
    widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
    rule = '  '.join('=' * w for w in widths)
    lines += [rule, '  '.join(c.ljust(w) for c, w in zip(header, widths, strict=True)), rule]
    lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += [rule, '']
    validation = shear.get('validation')
    if validation:
        keys = ('m1', 'm2', 'c1', 'c2', 'alpha')
        lines += [f'Held-out validation (ring test seed {validation.get("seed")}, '
                  f'{validation["n_galaxies"]} galaxies, {validation["n_units"]} '
                  f'galaxy-bands; calibrated estimates; 1-sigma bootstrap errors over '
                  f'galaxies; SNR: the band\'s matched-filter SNR; :doc:`validation`):', '']
        header = ['SNR', 'galaxies'] + list(keys)
        rows = [['all', str(validation['n_galaxies'])]
                + [f'{validation[k]:+.4f} +- {validation[k + "_err"]:.4f}' for k in keys]]
        for b in validation.get('bins', []):
            low, high = b['snr_range']
            name = f'{low:.0f}-{high:.0f}' if high < 1e3 else f'> {low:.0f}'
            rows.append([name, str(b['n_galaxies'])]
                        + [f'{b[k]:+.4f} +- {b[k + "_err"]:.4f}' for k in keys])
        widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
        rule = '  '.join('=' * w for w in widths)
        lines += [rule, '  '.join(c.ljust(w) for c, w in zip(header, widths, strict=True)),
                  rule]
        lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines += [rule, '']
    return lines


def rst_table(table, floatfmt='{:.4g}'):
    rows = [[str(c) for c in table.colnames]]
    for row in table:
        cells = []
        for name in table.colnames:
            value = row[name]
            value = getattr(value, 'value', value)
            cells.append(floatfmt.format(value) if isinstance(value, float) else str(value))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = '  '.join('=' * w for w in widths)
    out = [line, '  '.join(c.ljust(w) for c, w in zip(rows[0], widths, strict=True)), line]
    out += ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows[1:]]
    out.append(line)
    return '\n'.join(out)


def main(card_path, report_dir, out='docs/model_card.rst'):
    card = json.loads(Path(card_path).read_text())
    report = Path(report_dir)
    training = card['training']
    sim = training['simulation_config']
    single = card['n_bands'] == 1
    title = 'Model card: the single-band model' if single else 'Model card'
    role = ('The single-band model' if single else 'The default (3-band) model')
    lines = ['*' * len(title), title, '*' * len(title), '',
             f'{role}, ``{Path(card_path).stem}``, ships in ``psfdeconv/data/``; '
             '``psfdeconv info`` prints its card and checks its SHA-256. This page is '
             'generated by ``python docs/make_model_card.py CARD REPORT_DIR [OUT]`` from the '
             'card and the evaluation report.', '',
             'Model', '=====', '',
             f'* architecture: ``{card["architecture"]}`` '
             f'{json.dumps(card["architecture_config"])}',
             f'* input kinds: {", ".join(card["input_kinds"])}; bands: {card["n_bands"]}; '
             f'stamps: {card["stamp_size"]}x{card["stamp_size"]} pixels',
             f'* output floor removal: {card.get("output_floor")}',
             _symmetry_line(card.get('symmetries') or 1),
             f'* weights SHA-256: ``{card["weights_sha256"]}``', '',
             'Training data', '=============', '',
             f'* simulation seed {training["simulation_seed"]}, file '
             f'``{training["simulation_file"]}``; {training["n_train"]} training and '
             f'{training["n_validation"]} validation objects',
             f'* pixel scales {sim["pixel_scale_range"]} arcsec/pixel, PSF families '
             f'{", ".join(sim.get("psf_families", ["moffat"]))}, FWHM '
             f'{sim["psf_fwhm_range"]} arcsec, Moffat beta {sim["psf_beta_range"]}, PSF shear '
             f'{sim["psf_shear_range"]}, disk half-light radius '
             f'{sim["half_light_radius_range"]} arcsec, blank fraction '
             f'{sim["blank_fraction"]}', '',
             'Training', '========', '',
             f'* configuration: ``{json.dumps(training["config"])}``',
             f'* epochs run: {training["epochs_run"]} (best: {training["best_epoch"]}, '
             f'validation loss {training["best_val_loss"]:.5f}); '
             f'{training["elapsed_seconds"] / 60:.1f} minutes on '
             f'{_device(training)}, {training["train_stamps_per_second"]} stamps/s',
             *([f'* fine-tuned from the model file with SHA-256 '
                f'``{training["initial_weights_sha256"]}``']
               if training.get('initial_weights_sha256') else []), '',
             '======  ==========  ===============  =========',
             'epoch   loss        validation loss  minutes',
             '======  ==========  ===============  =========']
    for h in training['history']:
        lines.append(f'{h["epoch"]:<6d}  {h["loss"]:<10.5f}  {h["val_loss"]:<15.5f}  '
                     f'{h["elapsed_seconds"] / 60:<9.1f}')
    lines += ['======  ==========  ===============  =========', '']
    leakage = card.get('psf_leakage')
    lines += _section('PSF-leakage correction', leakage and (
        f'Each band image is sheared by g = -alpha e_PSF / 2 about its centroid, '
        f'alpha = {leakage["alpha"]:.4f} (`~psfdeconv.calibrate.fit_psf_leakage`): '
        f'on the {leakage["n_objects"]} validation object-bands the slope of the '
        f'ellipticity error on the PSF ellipticity goes from '
        f'{leakage["measured_leakage"]:.4f} to {leakage["residual_leakage"]:.4f}.'))
    size_bias = card.get('size_bias')
    lines += _section('Size-bias correction', size_bias and (
        f'``{size_bias["form"]}``, coefficients (c0, c1, c2) = '
        f'{[round(c, 5) for c in size_bias["coefficients"]]} '
        f'(`~psfdeconv.calibrate.fit_size_bias`), fitted on '
        f'{size_bias["n_objects"]} validation object-bands.'))
    bias = card.get('flux_bias') or {}
    lines += _section('Flux-bias correction', (
        f'``{bias.get("form")}``, coefficients (c0, c1, c2) = '
        f'{[round(c, 5) for c in bias.get("coefficients", [])]}, fitted on '
        f'{bias.get("n_objects")} validation object-bands.'))
    detection = card.get('detection')
    lines += _section('Detection threshold', detection and (
        f'A stamp whose detection SNR (sum of the band fluxes over the root sum of '
        f'their squared errors) is below {detection["snr_threshold"]:.2f} has no '
        f'significant source: its deconvolved images are 0. Fitted on the '
        f'validation objects (`~psfdeconv.calibrate.fit_detection_threshold`): '
        f'{100 * detection["blank_recall"]:.1f} % of the {detection["n_blank"]} '
        f'blanks and {100 * detection["sources_below"]:.2f} % of the '
        f'{detection["n_sources"]} sources fall below it (targets: '
        f'{100 * detection.get("target_blank_recall", 0.995):.1f} % of the '
        f'blanks unless that takes more than '
        f'{100 * detection.get("max_sources_below", 0.01):.0f} % of the '
        f'sources).'), none='None (no detection gate).')
    shear = card.get('shear_response')
    if shear:
        lines += ['Shear response', '==============', ''] + _shear_lines(shear)
    else:
        lines += _section('Shear response', None, none=(
            'None: `~psfdeconv.deconvolve.deconvolve_stamps` gives no shear estimates and '
            'the catalogue\'s ``shear_*`` columns are NaN (``psfdeconv calibrate-shear`` '
            'fits one).'))
    lines += ['Validation metrics (unweighted moments, bands pooled)',
              '=====================================================', '',
              '.. code-block:: json', '']
    lines += ['    ' + line for line in json.dumps(card.get('metrics'), indent=2).splitlines()]
    lines += ['']
    if report.exists():
        lines += ['Evaluation on a held-out test set', '=================================', '',
                  (report / 'command.txt').read_text().strip() if (report / 'command.txt')
                  .exists() else '', '']
        for name, title in (('table1', 'PSNR and 1 - SSIM (paper Table 1)'),
                            ('table2', 'Unweighted moments, prediction - truth (paper '
                                       'Table 2; mean and RMS)'),
                            ('table2_hsm', 'HSM adaptive moments, prediction - truth'),
                            ('table3', 'Blank / low / medium / high classification'),
                            ('flux_bias', 'Flux bias per truth-flux class (per cent; the '
                                          'correction fitted on the validation objects)'),
                            ('correlations', 'Ellipticity correlations with the PSF and the '
                                             'truth (paper Fig. 7)')):
            path = report / f'{name}.ecsv'
            if path.exists():
                table = QTable.read(path)
                if name == 'correlations':
                    # The model's rows beside the truth's null level.
                    table = table[[m in ('truth', 'model') for m in table['method']]]
                lines += [title, '-' * len(title), '', rst_table(table), '']
    # The prose on why this model ships and what is weak in it is kept beside the model's
    # provenance (data/NAME/notes.rst), so that regenerating the card keeps it current.
    notes = Path(__file__).resolve().parents[1] / 'data' / card['name'] / 'notes.rst'
    if notes.exists():
        lines += ['Why this model, and its weaknesses', '==================================',
                  '', notes.read_text().strip(), '']
    lines += ['Intended use', '============', '',
              'Isolated galaxies in images whose PSFs, pixel scales and noise lie within the '
              'training ranges above; see :doc:`limitations`.', '']
    Path(out).write_text('\n'.join(lines))


if __name__ == '__main__':
    main(*sys.argv[1:])
