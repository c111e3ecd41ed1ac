"""Our merlin-systems operators, one stage each: lookup -> transform -> tower -> search.

Raw feature values that are unknown travel as MISSING and are encoded like NVTabular's nulls.
"""

import numpy as np

MISSING = np.iinfo(np.int32).min  # a raw categorical value that is absent (NVTabular: null)
