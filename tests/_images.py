"""Analytic test images shared by the test modules."""

import numpy as np


def elliptical_gaussian(shape, sigma_x, sigma_y, theta, x0, y0, flux=1.0):
    """Elliptical Gaussian sampled at pixel centres, major axis at angle
    ``theta`` from the x axis, normalised to ``flux``."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    dx, dy = x - x0, y - y0
    c, s = np.cos(theta), np.sin(theta)
    major = c * dx + s * dy
    minor = -s * dx + c * dy
    image = np.exp(-0.5 * ((major / sigma_x)**2 + (minor / sigma_y)**2))
    return flux * image / image.sum()
