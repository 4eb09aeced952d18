"""advtune: adversarial examples against frozen classifiers, fast and with little memory.

The core is :func:`tune`, which runs every Conv→BatchNorm block of a model in Tune mode
(BN folded into the conv weight on the fly) or in a leaner mode; attacks live in
:mod:`advtune.attacks`.
"""

from advtune._version import __version__
from advtune.convbn import MODES, ConvBNReport, convbn_report, tune

__all__ = ["MODES", "ConvBNReport", "__version__", "convbn_report", "tune"]
