"""Architecture adapters: where each family keeps its routers, experts and shared experts.

The names below are imported on first use (PEP 562), so that a torch-free module of this
package (`family_table`, read by `moe-compress families`) does not pull in torch through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports_on_first_use

#: public name -> the submodule that defines it
_EXPORTS = {
    "ExpertTensor": ".adapter",
    "MoEAdapter": ".adapter",
    "auto_model_class": ".catalog",
    "standard_moe_model_types": ".catalog",
    "expert_forward": ".expert_math",
    "get_adapter": ".registry",
    "refusal": ".registry",
    "supported_model_types": ".registry",
}
__all__ = sorted(_EXPORTS)


__getattr__ = exports_on_first_use(__name__, _EXPORTS)


if TYPE_CHECKING:
    from .adapter import ExpertTensor, MoEAdapter
    from .catalog import auto_model_class, standard_moe_model_types
    from .expert_math import expert_forward
    from .registry import get_adapter, refusal, supported_model_types
