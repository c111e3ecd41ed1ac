"""Our merlin-systems operators, one stage each: lookup -> transform -> tower -> search.

Raw feature values that are unknown travel as MISSING and are encoded like NVTabular's nulls.
"""

import numpy as np

MISSING = np.iinfo(np.int32).min  # a raw categorical value that is absent (NVTabular: null)


class ArrayOperator:
    """Mixin: an operator whose work is `run(columns) -> columns` on plain numpy arrays.

    `transform` wraps it for merlin's executors (TensorTable in, TensorTable out), while our
    graph runner calls `run` directly and skips building a TensorTable per node.
    """

    def run(self, columns: dict) -> dict:
        raise NotImplementedError

    @property
    def supported_formats(self):
        from merlin.dag import DataFormats

        return DataFormats.NUMPY_TENSOR_TABLE

    def transform(self, col_selector, transformable):
        columns = {name: transformable[name].values for name in transformable.columns}
        return type(transformable)(self.run(columns))
