"""Calibration: what a similarity means as an error rate, and thresholds chosen by a target rate.

Two kinds, one per way of measuring:

- ``shipped``: ``Calibration``, similarity -> false-match rate per comparison (FMR, with a 95%
  upper bound) and FNMR, measured on a labeled set (`facelake evaluate`; the LFW tables shipped
  in facelake/data, ``load_default`` / ``load``); thresholds by target FMR or by FPIR at a
  gallery size.
- ``gallery``: ``GalleryCalibration``, FPIR measured directly by non-mated searches against one
  index version (`facelake calibrate`), with an extrapolated tail on request.
- ``stats``: the numbers both share: binomial bounds (Wilson, Clopper-Pearson), FMR <-> FPIR over
  a gallery, the generalised Pareto tail fit (scipy.stats).
- ``formats``: the versioned JSON of both kinds.
- ``store``: where live-gallery calibrations live under ROOT/calibration/, save/load/find, and
  ``load_any`` for a file of either kind.
- ``thresholds``: a search's threshold policy: which calibration serves it, the threshold and how
  it was chosen, the false-match rate of each candidate.

Tests: tests/test_calibration.py (all modules, and every shipped file reproduced),
tests/test_calibrate.py (a gallery calibration measured and used by search), tests/test_search.py
(the threshold policy).
"""

from facelake.calibration.formats import SCHEMA_VERSION
from facelake.calibration.gallery import GALLERY_MARGIN, GalleryCalibration
from facelake.calibration.shipped import Calibration, load, load_default, shipped_path
from facelake.calibration.stats import (CalibrationError, clopper_pearson_upper, fit_tail, fmr_for_fpir,
                                        fpir_at_calibrated_size, gpd_pwm, wilson_upper)
from facelake.calibration.store import (GALLERY_SUFFIX, find_gallery, gallery_dir, load_any, load_gallery,
                                        save_gallery)
