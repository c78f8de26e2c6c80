# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Fluxes, centroids, ellipticities and sizes of galaxy images.

The core functions work on arrays of shape ``(..., ny, nx)`` and return
dictionaries of arrays of the leading shape ``(...)``:

* `image_moments`: unweighted moments (the paper's estimator, paper-spec
  5.1, after HW23 Eq. 10), used for truth, prediction and PSF alike;
* `hsm_moments`: GalSim's adaptive (elliptical Gaussian weighted)
  moments, a robust cross-check on noisy images;
* `snr`: the matched-filter signal-to-noise ratio (HW23 Eq. 25);
* `sky_jacobian`, `sky_ellipticity`, `sky_shear`: pixel-frame ellipticities
  and shear estimates carried onto the sky axes (east, north) with the local
  WCS Jacobian.

`measure_table` is the astropy edge: it measures a stack of multi-band
stamps ``(n, n_bands, ny, nx)`` and returns a `~astropy.table.QTable`
with one row per object and units on the columns.

Pixel coordinates are 0-based: ``x`` is the column index and ``y`` the
row index of a pixel centre, as in numpy and photutils.
"""

import numpy as np
from astropy import units as u
from astropy.table import QTable

from ._validation import as_image_array, broadcast_pixel_scale, check_band_names
from .exceptions import InvalidInputError, ShapeMismatchError

__all__ = ['image_moments', 'hsm_moments', 'windowed_centroid', 'measure_table',
           'snr', 'sky_jacobian', 'sky_ellipticity', 'sky_shear', 'SKY_SHAPE_CONVENTION']

# Moment definitions recorded in the metadata of `measure_table`.
_MOMENT_DEFINITIONS = {
    'flux': 'M0 = sum(I)',
    'x': 'sum(x I) / M0, x = 0-based column index',
    'y': 'sum(y I) / M0, y = 0-based row index',
    'second_moments': 'Mij = sum((i - ibar)(j - jbar) I) / M0 (unweighted)',
    'e1': '(Mxx - Myy) / (Mxx + Myy)',
    'e2': '2 Mxy / (Mxx + Myy)',
    'e': 'hypot(e1, e2)',
    'size': 'sqrt(Mxx + Myy), converted with the pixel scale',
    'hsm': ('galsim.hsm.FindAdaptiveMom(strict=False): distortion '
            'e1, e2 of the best-fit elliptical Gaussian, its sigma '
            '(det(M)^(1/4)) and amplitude; status 0 is success'),
}

_HSM_FAILED = -1       # GalSim's own failure code
_HSM_NONPOSITIVE = -2  # GalSim "converged" on a negative-amplitude fit


def image_moments(images, *, pixel_scale=None):
    r"""Unweighted moments of each image in a stack.

    The paper's shape estimator (paper-spec 5.1, HW23 Eq. 10): with pixel
    indices :math:`x` (column) and :math:`y` (row) starting at 0,

    .. math::

        M_0 = \sum I, \quad \bar x = \sum x I / M_0, \quad
        M_{xx} = \sum (x - \bar x)^2 I / M_0, \quad
        M_{xy} = \sum (x - \bar x)(y - \bar y) I / M_0,

        e_1 = \frac{M_{xx} - M_{yy}}{M_{xx} + M_{yy}}, \quad
        e_2 = \frac{2 M_{xy}}{M_{xx} + M_{yy}}, \quad
        |e| = \sqrt{e_1^2 + e_2^2}, \quad
        \mathrm{size} = \sqrt{M_{xx} + M_{yy}}.

    For an elliptical Gaussian with axis widths :math:`\sigma_a,
    \sigma_b` these give :math:`e = (\sigma_a^2 - \sigma_b^2) /
    (\sigma_a^2 + \sigma_b^2)` (the distortion, or chi-type ellipticity)
    and size :math:`\sqrt{\sigma_a^2 + \sigma_b^2}`. Unweighted moments
    are sensitive to noise in the outer pixels; use them on noiseless or
    denoised images and apply the same estimator to truth, prediction
    and PSF.

    Parameters
    ----------
    images : array_like or `~astropy.units.Quantity`
        Images of shape ``(..., ny, nx)``, finite. A Quantity's unit is
        ignored (the fluxes are returned as plain numbers in that unit).
    pixel_scale : float, array_like or `~astropy.units.Quantity`, optional
        Pixel scale in arcsec/pixel (or a Quantity in angle/pixel),
        broadcastable to the leading shape ``(...)`` with numpy rules
        (per-object scales of ``(n, n_bands)`` stamps have shape
        ``(n, 1)``). If given, ``size`` is in arcsec; otherwise in
        pixels.

    Returns
    -------
    moments : dict of `~numpy.ndarray`
        Arrays of the leading shape ``(...)``: ``'flux'`` (:math:`M_0`,
        image units), ``'x'``, ``'y'`` (centroid, pixels, 0-based),
        ``'e1'``, ``'e2'``, ``'e'`` (dimensionless), ``'size'`` (pixels
        or arcsec). Where :math:`M_0 \le 0` the centroid, ellipticities
        and size are NaN; where :math:`M_{xx} + M_{yy} \le 0` the
        ellipticities and size are NaN. No warning is emitted.

    Raises
    ------
    psfdeconv.exceptions.InvalidPixelsError
        If an image has NaN or inf pixels.
    psfdeconv.exceptions.ShapeMismatchError
        If ``images`` is not at least 2-D or ``pixel_scale`` does not
        broadcast.
    psfdeconv.exceptions.PixelScaleError
        If ``pixel_scale`` is not positive and finite.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.measure import image_moments
    >>> y, x = np.mgrid[0:64, 0:64]
    >>> image = np.exp(-0.5 * (((x - 30) / 4.0)**2 + ((y - 33) / 2.0)**2))
    >>> m = image_moments(image, pixel_scale=0.2)
    >>> print(f"{m['x']:.2f} {m['y']:.2f} {m['e1']:.3f} {m['size']:.3f}")
    30.00 33.00 0.600 0.894
    """
    data, _ = as_image_array(images, 'images')
    ny, nx = data.shape[-2:]
    leading = data.shape[:-2]
    xs = np.arange(nx, dtype=float)
    ys = np.arange(ny, dtype=float)

    with np.errstate(divide='ignore', invalid='ignore'):
        flux = data.sum(axis=(-2, -1))
        # Marginals make the first and diagonal second moments cheap.
        profile_x = data.sum(axis=-2)
        profile_y = data.sum(axis=-1)
        positive = flux > 0
        safe_flux = np.where(positive, flux, 1.0)
        xbar = (profile_x @ xs) / safe_flux
        ybar = (profile_y @ ys) / safe_flux
        dx = xs - xbar[..., None]
        dy = ys - ybar[..., None]
        mxx = np.sum(profile_x * dx**2, axis=-1) / safe_flux
        myy = np.sum(profile_y * dy**2, axis=-1) / safe_flux
        # sum_ij I_ij dy_i dx_j as a matrix product: no image-sized temporary.
        mxy = np.sum(dy * (data @ dx[..., None])[..., 0], axis=-1) / safe_flux
        trace = mxx + myy
        # Round-off leaves a trace of ~eps^2 (not 0) for a single-pixel
        # image; below this floor there is no measurable shape.
        ny, nx = data.shape[-2:]
        floor = 16 * np.finfo(float).eps ** 2 * (nx ** 2 + ny ** 2)
        valid = positive & (trace > floor)
        safe_trace = np.where(valid, trace, 1.0)
        e1 = np.where(valid, (mxx - myy) / safe_trace, np.nan)
        e2 = np.where(valid, 2.0 * mxy / safe_trace, np.nan)
        size = np.where(valid, np.sqrt(np.abs(safe_trace)), np.nan)

    if pixel_scale is not None:
        size = size * broadcast_pixel_scale(pixel_scale, leading)

    return {
        'flux': np.asarray(flux, dtype=float),
        'x': np.where(positive, xbar, np.nan),
        'y': np.where(positive, ybar, np.nan),
        'e1': e1,
        'e2': e2,
        'e': np.hypot(e1, e2),
        'size': np.asarray(size, dtype=float),
    }


def hsm_moments(images, *, pixel_scale=None, guess_sigma=5.0):
    """Adaptive moments (GalSim HSM) of each image in a stack.

    Runs `galsim.hsm.FindAdaptiveMom` with ``strict=False`` on every 2-D
    image: the best-fit elliptical Gaussian weight gives shapes that are
    far less sensitive to noise than `image_moments`. Images where the
    fit fails (blank, pure noise, negative) give NaN and a non-zero
    status instead of raising.

    Parameters
    ----------
    images : array_like or `~astropy.units.Quantity`
        Images of shape ``(..., ny, nx)``, finite.
    pixel_scale : float, array_like or `~astropy.units.Quantity`, optional
        Pixel scale in arcsec/pixel, broadcastable to the leading shape
        (as in `image_moments`). If given, ``hsm_sigma`` is in arcsec;
        otherwise in pixels.
    guess_sigma : float, optional
        Starting width of the weight, in pixels (GalSim's ``guess_sig``).

    Returns
    -------
    moments : dict of `~numpy.ndarray`
        Arrays of the leading shape ``(...)``:

        * ``'hsm_e1'``, ``'hsm_e2'``: distortion-type ellipticity
          (``observed_shape.e1, .e2``), the same convention as
          `image_moments`' ``e1, e2``;
        * ``'hsm_sigma'``: :math:`\\det(M)^{1/4}` of the weight, pixels
          or arcsec;
        * ``'hsm_x'``, ``'hsm_y'``: centroid, pixels, 0-based;
        * ``'hsm_flux'``: ``moments_amp`` (the total flux if the image
          is an elliptical Gaussian), image units;
        * ``'hsm_status'``: int, 0 on success, GalSim's non-zero
          ``moments_status`` (-1) when it fails, and -2 when it returns a
          non-positive amplitude or width.

        The float entries are NaN where the status is non-zero.

    Raises
    ------
    psfdeconv.exceptions.InvalidPixelsError
        If an image has NaN or inf pixels.
    psfdeconv.exceptions.InvalidInputError
        If ``guess_sigma`` is not positive.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.measure import hsm_moments
    >>> y, x = np.mgrid[0:64, 0:64]
    >>> image = np.exp(-0.5 * (((x - 30) / 4.0)**2 + ((y - 33) / 2.0)**2))
    >>> blank = np.zeros_like(image)
    >>> m = hsm_moments(np.stack([image, blank]))
    >>> print(f"{m['hsm_e1'][0]:.3f} {m['hsm_x'][0]:.2f} {m['hsm_sigma'][0]:.3f}")
    0.600 30.00 2.828
    >>> print(m['hsm_status'][1], m['hsm_e1'][1])
    -1 nan
    """
    import galsim

    data, _ = as_image_array(images, 'images')
    if not (np.isfinite(guess_sigma) and guess_sigma > 0):
        msg = (f'guess_sigma must be a positive number of pixels, got '
               f'{guess_sigma!r}.')
        raise InvalidInputError(msg)
    leading = data.shape[:-2]
    flat = data.reshape((-1,) + data.shape[-2:])
    n = flat.shape[0]
    out = {key: np.full(n, np.nan) for key in
           ('hsm_e1', 'hsm_e2', 'hsm_sigma', 'hsm_x', 'hsm_y', 'hsm_flux')}
    status = np.full(n, _HSM_FAILED, dtype=int)

    for i in range(n):
        image = galsim.Image(np.ascontiguousarray(flat[i]), scale=1.0)
        result = galsim.hsm.FindAdaptiveMom(image, guess_sig=guess_sigma,
                                            strict=False)
        if result.moments_status != 0:
            status[i] = result.moments_status
            continue
        if not (result.moments_amp > 0 and result.moments_sigma > 0):
            status[i] = _HSM_NONPOSITIVE
            continue
        status[i] = 0
        shape = result.observed_shape
        out['hsm_e1'][i] = shape.e1
        out['hsm_e2'][i] = shape.e2
        out['hsm_sigma'][i] = result.moments_sigma
        # GalSim images start at (1, 1) with pixel centres on integers.
        out['hsm_x'][i] = result.moments_centroid.x - image.bounds.xmin
        out['hsm_y'][i] = result.moments_centroid.y - image.bounds.ymin
        out['hsm_flux'][i] = result.moments_amp

    out = {key: value.reshape(leading) for key, value in out.items()}
    if pixel_scale is not None:
        out['hsm_sigma'] = out['hsm_sigma'] * broadcast_pixel_scale(pixel_scale, leading)
    out['hsm_status'] = status.reshape(leading)
    return out


def windowed_centroid(images, x, y, radius, *, iterations=3):
    """Unweighted centroid inside a circular window that follows it.

    The light centroid of the source at (``x``, ``y``) without the
    neighbours and noise of the rest of the stamp: the first moment of the
    pixels within ``radius`` of the current centre, recentred
    ``iterations`` times.

    Parameters
    ----------
    images : array-like
        Shape (n, ny, nx).
    x, y : array-like
        Starting centres, shape (n,), 0-based pixels.
    radius : float or array-like
        Window radius in pixels, scalar or shape (n,).
    iterations : int, optional
        Number of recentrings.

    Returns
    -------
    x, y : `~numpy.ndarray`
        The centroids; NaN where the window holds no positive flux.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.measure import windowed_centroid
    >>> yy, xx = np.mgrid[:32, :32]
    >>> image = np.exp(-((xx - 10.3) ** 2 + (yy - 12.0) ** 2) / 8.0)
    >>> image[28, 28] = 50.0  # a neighbour the window leaves out
    >>> x, y = windowed_centroid(image[None], [11.0], [11.0], 6.0)
    >>> print(f'{x[0]:.2f} {y[0]:.2f}')
    10.30 12.00
    """
    images = np.asarray(images, dtype=np.float64)
    n = images.shape[0]
    x = np.array(x, dtype=np.float64).reshape(n)
    y = np.array(y, dtype=np.float64).reshape(n)
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,))
    yy, xx = np.mgrid[:images.shape[-2], :images.shape[-1]]
    for _ in range(iterations):
        inside = ((xx - x[:, None, None]) ** 2 + (yy - y[:, None, None]) ** 2
                  <= radius[:, None, None] ** 2)
        light = np.where(inside, images, 0.0)
        flux = light.sum(axis=(-2, -1))
        with np.errstate(invalid='ignore', divide='ignore'):
            x = np.where(flux > 0, (light * xx).sum(axis=(-2, -1)) / flux, np.nan)
            y = np.where(flux > 0, (light * yy).sum(axis=(-2, -1)) / flux, np.nan)
    return x, y


def snr(images_noiseless, noise_sigma):
    r"""Matched-filter signal-to-noise ratio of noiseless images.

    The GalSim / GREAT08 definition used by HW23 (Eq. 25) and by
    `galsim.Image.addNoiseSNR`:

    .. math::

        \mathrm{SNR} = \frac{\sqrt{\sum_{\rm pix} I^2}}{\sigma_n},

    with :math:`I` the noise-free (PSF-convolved) image and
    :math:`\sigma_n` the per-pixel standard deviation of white Gaussian
    noise.

    Parameters
    ----------
    images_noiseless : array_like or `~astropy.units.Quantity`
        Noise-free images of shape ``(..., ny, nx)``.
    noise_sigma : float, array_like or `~astropy.units.Quantity`
        Per-pixel noise standard deviation in the units of the images,
        broadcastable to the leading shape ``(...)``, positive. If both
        are Quantities, ``noise_sigma`` is converted to the images' unit.

    Returns
    -------
    snr : `~numpy.ndarray`
        Shape ``(...)``, dimensionless.

    Raises
    ------
    psfdeconv.exceptions.InvalidInputError
        If ``noise_sigma`` is not positive and finite, or has a unit the
        images do not share.
    psfdeconv.exceptions.ShapeMismatchError
        If ``noise_sigma`` does not broadcast to the leading shape.

    Examples
    --------
    >>> import numpy as np
    >>> from psfdeconv.measure import snr
    >>> image = np.zeros((2, 11, 11))
    >>> image[:, 5, 5] = [30.0, 60.0]
    >>> print(np.round(snr(image, 3.0), 2))
    [10. 20.]
    """
    data, unit = as_image_array(images_noiseless, 'images_noiseless')
    if isinstance(noise_sigma, u.Quantity):
        if unit is None:
            msg = (f'noise_sigma has unit {noise_sigma.unit!s} but the '
                   f'images have none; give both as Quantities or neither.')
            raise InvalidInputError(msg)
        try:
            noise_sigma = noise_sigma.to_value(unit)
        except u.UnitConversionError as exc:
            msg = (f'noise_sigma unit {noise_sigma.unit!s} cannot be '
                   f'converted to the image unit {unit!s}.')
            raise InvalidInputError(msg) from exc
    sigma = np.asarray(noise_sigma, dtype=float)
    if not np.all(np.isfinite(sigma) & (sigma > 0)):
        msg = (f'noise_sigma must be positive and finite, got '
               f'{noise_sigma!r}; for noiseless data the SNR is infinite.')
        raise InvalidInputError(msg)
    leading = data.shape[:-2]
    try:
        sigma = np.broadcast_to(sigma, leading)
    except ValueError as exc:
        msg = (f'noise_sigma of shape {sigma.shape} does not broadcast to '
               f'the images\' leading shape {leading}.')
        raise ShapeMismatchError(msg) from exc
    return np.sqrt(np.sum(data**2, axis=(-2, -1))) / sigma


#: The sky-frame ellipticity convention of `sky_ellipticity` (recorded in catalogue metadata).
SKY_SHAPE_CONVENTION = (
    'e1 = e cos(2 phi), e2 = e sin(2 phi), phi = 90 deg - PA, PA the position angle of '
    'the major axis from north through east; in the local tangent plane (u = dRA cos(Dec) '
    'east, v = dDec north): e1 = (Muu - Mvv)/(Muu + Mvv), e2 = 2 Muv/(Muu + Mvv); '
    'e1 > 0 elongated east-west (along RA), e1 < 0 north-south, e2 > 0 along '
    'north-east/south-west, e2 < 0 along north-west/south-east')


def sky_jacobian(wcs, x, y, *, step=0.5):
    r"""Local Jacobian of a celestial WCS, d(east, north) / d(x, y).

    At each pixel position, the derivatives of :math:`u = \Delta\alpha
    \cos\delta` (towards east: increasing longitude) and :math:`v =
    \Delta\delta` (towards north) with respect to the pixel column ``x`` and
    row ``y``, by central differences of ``wcs.pixel_to_world_values`` with
    ``step`` pixels on either side. For a frame other than equatorial
    (galactic, ecliptic) east and north mean increasing longitude and
    latitude of that frame.

    Parameters
    ----------
    wcs : `~astropy.wcs.WCS` or APE 14 WCS
        A two-dimensional celestial WCS.
    x, y : array_like
        0-based pixel column and row, broadcast together to shape ``(...)``.
    step : float, optional
        Half-width of the difference, in pixels.

    Returns
    -------
    jacobian : `~numpy.ndarray`
        Shape ``(..., 2, 2)``, degrees per pixel: ``[[du/dx, du/dy],
        [dv/dx, dv/dy]]``.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    >>> wcs.wcs.crval = [150.0, 0.0]
    >>> wcs.wcs.cd = [[-1e-4, 0.0], [0.0, 1e-4]]  # north up, east left
    >>> print(np.round(sky_jacobian(wcs, 0.0, 0.0) / 1e-4, 6))
    [[-1. -0.]
     [ 0.  1.]]
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    inner = getattr(wcs, 'wcs', None)
    lon_axis = getattr(inner, 'lng', 0)
    lat_axis = getattr(inner, 'lat', 1)
    if lon_axis < 0 or lat_axis < 0:
        lon_axis, lat_axis = 0, 1

    def world(dx, dy):
        values = wcs.pixel_to_world_values(x + dx, y + dy)
        return np.asarray(values[lon_axis], dtype=float), np.asarray(values[lat_axis],
                                                                      dtype=float)

    _, lat = world(0.0, 0.0)
    cos_lat = np.cos(np.deg2rad(lat))
    jacobian = np.empty(x.shape + (2, 2))
    for column, (dx, dy) in enumerate(((step, 0.0), (0.0, step))):
        lon_plus, lat_plus = world(dx, dy)
        lon_minus, lat_minus = world(-dx, -dy)
        # Longitude differences wrap at 0/360 deg.
        d_lon = (lon_plus - lon_minus + 180.0) % 360.0 - 180.0
        jacobian[..., 0, column] = d_lon * cos_lat / (2 * step)
        jacobian[..., 1, column] = (lat_plus - lat_minus) / (2 * step)
    return jacobian


def sky_ellipticity(e1, e2, jacobian):
    r"""Pixel-frame ellipticities in the sky frame.

    ``e1``, ``e2`` are distortions measured on the pixel axes (``x``
    column, ``y`` row), as `image_moments` and `hsm_moments` return them.
    The second-moment tensor they define, :math:`M \propto \begin{pmatrix}
    1 + e_1 & e_2 \\ e_2 & 1 - e_1 \end{pmatrix}`, is carried onto the sky
    axes (``u`` east, ``v`` north; see `sky_jacobian`) as :math:`M' = J M
    J^T` and the sky ellipticities are read off it:

    .. math::

        e_1' = \frac{M'_{uu} - M'_{vv}}{M'_{uu} + M'_{vv}}, \quad
        e_2' = \frac{2 M'_{uv}}{M'_{uu} + M'_{vv}}.

    This is exact for unweighted moments, and for the adaptive (HSM)
    moments of an elliptical Gaussian, under the local linear map of the
    WCS. For a conformal map (rotation by :math:`\theta` from the pixel
    axes to the sky axes, a uniform scale) it is the spin-2 rotation
    :math:`e' = e\, e^{2 i \theta}`; a mirrored one (positive CD
    determinant: east to the right of north, as the pixels are shown) also
    flips the sign of :math:`e_2`. The convention (`SKY_SHAPE_CONVENTION`):
    :math:`e_1 = |e| \cos 2\phi`, :math:`e_2 = |e| \sin 2\phi`, with
    :math:`\phi = 90^\circ - \mathrm{PA}` and PA the position angle of the
    major axis measured from north through east; so :math:`e_1 > 0` is
    elongated east-west, :math:`e_2 > 0` along north-east/south-west.

    Parameters
    ----------
    e1, e2 : array_like
        Pixel-frame distortions, broadcast together to shape ``(...)``;
        NaN stays NaN.
    jacobian : array_like
        Shape ``(..., 2, 2)`` (or ``(2, 2)`` for all), d(east, north) /
        d(x, y) as `sky_jacobian` returns it; any units (they cancel).

    Returns
    -------
    e1_sky, e2_sky : `~numpy.ndarray`
        Sky-frame distortions of the broadcast shape.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If ``jacobian`` does not end in ``(2, 2)`` or does not broadcast.

    Examples
    --------
    A galaxy elongated along the pixel rows (``e1 = 0.5``) in an image with
    north up and east left is elongated east-west on the sky:

    >>> e1_sky, e2_sky = sky_ellipticity(0.5, 0.0, [[-1.0, 0.0], [0.0, 1.0]])
    >>> print(np.round(e1_sky, 6), np.round(e2_sky, 6))
    0.5 0.0
    """
    jacobian = np.asarray(jacobian, dtype=float)
    if jacobian.ndim < 2 or jacobian.shape[-2:] != (2, 2):
        msg = (f'jacobian must have shape (..., 2, 2), got {jacobian.shape}; '
               f'give d(east, north)/d(x, y) from sky_jacobian.')
        raise ShapeMismatchError(msg)
    e1, e2 = np.asarray(e1, dtype=float), np.asarray(e2, dtype=float)
    try:
        shape = np.broadcast_shapes(e1.shape, e2.shape, jacobian.shape[:-2])
    except ValueError as exc:
        msg = (f'e1 {e1.shape}, e2 {e2.shape} and jacobian {jacobian.shape} do '
               f'not broadcast together.')
        raise ShapeMismatchError(msg) from exc
    e1, e2 = np.broadcast_to(e1, shape), np.broadcast_to(e2, shape)
    jacobian = np.broadcast_to(jacobian, shape + (2, 2))
    moments = np.empty(shape + (2, 2))
    moments[..., 0, 0] = 1.0 + e1
    moments[..., 1, 1] = 1.0 - e1
    moments[..., 0, 1] = moments[..., 1, 0] = e2
    sky = jacobian @ moments @ np.swapaxes(jacobian, -1, -2)
    with np.errstate(divide='ignore', invalid='ignore'):
        trace = sky[..., 0, 0] + sky[..., 1, 1]
        e1_sky = (sky[..., 0, 0] - sky[..., 1, 1]) / trace
        e2_sky = 2.0 * sky[..., 0, 1] / trace
    return e1_sky, e2_sky


def measure_table(images, *, pixel_scale, bands=None, unit=None,
                  psf_images=None, hsm=True):
    """Measure multi-band stamps into a table with one row per object.

    Parameters
    ----------
    images : array_like or `~astropy.units.Quantity`
        Stamps of shape ``(n, n_bands, ny, nx)``, finite.
    pixel_scale : float, array_like or `~astropy.units.Quantity`
        Pixel scale in arcsec/pixel: a scalar, per object ``(n,)``, or
        per object and band ``(n, n_bands)``.
    bands : sequence of str, optional
        One name per band, used as column suffixes; default
        ``('b0', 'b1', ...)``.
    unit : `~astropy.units.Unit` or str, optional
        Unit of the pixel values, given to the flux columns. Defaults to
        the unit of ``images`` if it is a Quantity, else none.
    psf_images : array_like, optional
        PSFs of shape ``(n, n_bands, py, px)``; adds the columns
        ``psf_e1_<band>``, ``psf_e2_<band>`` (unweighted moments).
    hsm : bool, optional
        Add the `hsm_moments` columns (about 0.1 ms per image).

    Returns
    -------
    table : `~astropy.table.QTable`
        Columns ``id`` and, per band, ``flux_<band>`` (``unit``),
        ``x_<band>``, ``y_<band>`` (pix, 0-based), ``e1_<band>``,
        ``e2_<band>``, ``e_<band>``, ``size_<band>`` (arcsec), the HSM
        columns ``hsm_e1_<band>``, ``hsm_e2_<band>``,
        ``hsm_sigma_<band>`` (arcsec), ``hsm_x_<band>``, ``hsm_y_<band>``
        (pix), ``hsm_flux_<band>``, ``hsm_status_<band>`` and the PSF
        columns, each with a ``description``. ``meta`` records the
        moment definitions, bands and pixel convention.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If ``images`` is not 4-D, ``psf_images`` does not match its first
        two axes, or ``bands`` has the wrong length.
    psfdeconv.exceptions.InvalidPixelsError
        If ``images`` or ``psf_images`` have NaN or inf pixels.
    psfdeconv.exceptions.PixelScaleError
        If ``pixel_scale`` is not positive and finite.

    Examples
    --------
    >>> import numpy as np
    >>> import astropy.units as u
    >>> from psfdeconv.measure import measure_table
    >>> y, x = np.mgrid[0:32, 0:32]
    >>> blob = np.exp(-0.5 * (((x - 15) / 3.0)**2 + ((y - 16) / 2.0)**2))
    >>> stamps = np.stack([np.stack([blob, 2 * blob])] * 3)  # (3, 2, 32, 32)
    >>> t = measure_table(stamps, pixel_scale=0.2, bands=('g', 'r'),
    ...                   unit=u.nJy, hsm=False)
    >>> print(len(t), t['flux_r'].unit, t['size_g'].unit)
    3 nJy arcsec
    >>> print(f"{t['e1_g'][0]:.3f} {t['x_r'][0]:.2f}")
    0.385 15.00 pix
    """
    data, image_unit = as_image_array(images, 'images')
    if data.ndim != 4:
        msg = (f'images must have shape (n, n_bands, ny, nx), got '
               f'{data.shape}; add a band axis with images[:, None] for '
               f'single-band stamps.')
        raise ShapeMismatchError(msg)
    n, n_bands = data.shape[:2]
    band_names = check_band_names(bands, n_bands)
    scale = broadcast_pixel_scale(pixel_scale, (n, n_bands), per_object=True)
    flux_unit = u.Unit(unit) if unit is not None else image_unit

    table = QTable()
    table['id'] = np.arange(n)
    table['id'].info.description = 'Index of the object in the input stack'

    def add(name, values, col_unit, description):
        for j, band in enumerate(band_names):
            column = f'{name}_{band}'
            col = values[:, j]
            table[column] = col * col_unit if col_unit is not None else col
            table[column].info.description = f'{description} ({band} band)'

    moments = image_moments(data)
    add('flux', moments['flux'], flux_unit, 'Total flux M0 = sum(I)')
    add('x', moments['x'], u.pix, 'Unweighted centroid, 0-based column')
    add('y', moments['y'], u.pix, 'Unweighted centroid, 0-based row')
    add('e1', moments['e1'], None, 'Unweighted ellipticity (Mxx-Myy)/(Mxx+Myy)')
    add('e2', moments['e2'], None, 'Unweighted ellipticity 2Mxy/(Mxx+Myy)')
    add('e', moments['e'], None, 'Unweighted |e| = hypot(e1, e2)')
    add('size', moments['size'] * scale, u.arcsec,
        'Unweighted size sqrt(Mxx+Myy)')

    if hsm:
        shapes = hsm_moments(data)
        add('hsm_e1', shapes['hsm_e1'], None, 'HSM adaptive-moment distortion e1')
        add('hsm_e2', shapes['hsm_e2'], None, 'HSM adaptive-moment distortion e2')
        add('hsm_sigma', shapes['hsm_sigma'] * scale, u.arcsec,
            'HSM adaptive-moment width det(M)^(1/4)')
        add('hsm_x', shapes['hsm_x'], u.pix, 'HSM centroid, 0-based column')
        add('hsm_y', shapes['hsm_y'], u.pix, 'HSM centroid, 0-based row')
        add('hsm_flux', shapes['hsm_flux'], flux_unit,
            'HSM amplitude (flux of the best-fit elliptical Gaussian)')
        add('hsm_status', shapes['hsm_status'], None,
            'HSM status: 0 ok, -1 failed, -2 non-positive fit')

    if psf_images is not None:
        psf_data, _ = as_image_array(psf_images, 'psf_images')
        if psf_data.ndim != 4 or psf_data.shape[:2] != (n, n_bands):
            msg = (f'psf_images must have shape (n, n_bands, py, px) = '
                   f'({n}, {n_bands}, py, px) to match images, got '
                   f'{psf_data.shape}.')
            raise ShapeMismatchError(msg)
        psf_moments = image_moments(psf_data)
        add('psf_e1', psf_moments['e1'], None, 'PSF unweighted ellipticity e1')
        add('psf_e2', psf_moments['e2'], None, 'PSF unweighted ellipticity e2')

    table.meta['bands'] = list(band_names)
    table.meta['pixel_convention'] = ('0-based; x = column, y = row; '
                                      'pixel centres on integers')
    table.meta['moment_definitions'] = dict(_MOMENT_DEFINITIONS)
    return table


def sky_shear(g1, g2, jacobian):
    r"""Pixel-frame shear estimates on the sky axes.

    A shear estimate is a spin-2 quantity: on axes turned by :math:`\theta`
    it becomes :math:`g' = g\, e^{2 i \theta}`, and a mirrored frame also
    flips the sign of :math:`g_2`. The turn and the parity are those of the
    local WCS Jacobian's orthogonal polar factor :math:`U` (:math:`J = U
    P`, :math:`P` symmetric positive definite); the scale and the small
    shear of the WCS itself (:math:`P`) are left out, because a shear
    estimate is calibrated in the pixel frame it was measured in. The
    convention is `sky_ellipticity`'s (`SKY_SHAPE_CONVENTION`):
    :math:`g_1 > 0` east-west, :math:`g_2 > 0` along north-east/south-west.

    Parameters
    ----------
    g1, g2 : array_like
        Pixel-frame shear estimates (as ``deconvolve_stamps`` details
        ``'shear_g1'``, ``'shear_g2'``), broadcast together; NaN stays NaN.
    jacobian : array_like
        Shape ``(..., 2, 2)`` or ``(2, 2)``, d(east, north) / d(x, y) as
        `sky_jacobian` returns it.

    Returns
    -------
    g1_sky, g2_sky : `~numpy.ndarray`
        Sky-frame shear estimates of the broadcast shape.

    Raises
    ------
    psfdeconv.exceptions.ShapeMismatchError
        If ``jacobian`` does not end in ``(2, 2)`` or does not broadcast.

    Examples
    --------
    North up and east left (the usual orientation): the pixel rows run
    east-west, so a shear along them stays ``g1 > 0``, and one along the
    pixel diagonal x = y runs north-west/south-east on the sky (``g2 < 0``);
    on the same sky with north to the left and east down (turned by 90
    degrees) both signs change:

    >>> import numpy as np
    >>> from psfdeconv.measure import sky_shear
    >>> print(np.round(sky_shear(0.02, 0.01, [[-1.0, 0.0], [0.0, 1.0]]), 6))
    [ 0.02 -0.01]
    >>> print(np.round(sky_shear(0.02, 0.01, [[0.0, -1.0], [-1.0, 0.0]]), 6))
    [-0.02  0.01]
    """
    jacobian = np.asarray(jacobian, dtype=float)
    if jacobian.ndim < 2 or jacobian.shape[-2:] != (2, 2):
        msg = (f'jacobian must have shape (..., 2, 2), got {jacobian.shape}; '
               f'give d(east, north)/d(x, y) from sky_jacobian.')
        raise ShapeMismatchError(msg)
    # Orthogonal polar factor U = W V^T of J = W S V^T; a NaN Jacobian stays NaN.
    finite = np.isfinite(jacobian).all(axis=(-2, -1))
    safe = np.where(finite[..., None, None], jacobian, np.eye(2))
    w, _, vt = np.linalg.svd(safe)
    turn = np.where(finite[..., None, None], w @ vt, np.nan)
    # M = [[1 + g1, g2], [g2, 1 - g1]] turned by an orthogonal U keeps its
    # trace, so sky_ellipticity is exactly the spin-2 rotation here.
    return sky_ellipticity(g1, g2, turn)
