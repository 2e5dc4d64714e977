"""Op rules by family; importing this package registers them all."""

from . import (attention_ops, creation_ops, index_ops, loss_ops, matrix_ops,  # noqa: F401
               norm_ops, pointwise_ops, reduction_ops, scan_ops, scatter_ops, view_ops)
