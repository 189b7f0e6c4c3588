"""gnivo-trl: GN-IVO and VIMPO, critic-free RL fine-tuning of language models, as TRL GRPOTrainer subclasses."""

__version__ = "0.1.0"

from .gnivo_config import GNIVOConfig  # noqa: E402
from .gnivo_trainer import GNIVOTrainer  # noqa: E402
from .group_bookkeeping import RewardFunctionError  # noqa: E402
from .vimpo_config import VIMPOConfig  # noqa: E402
from .vimpo_trainer import VIMPOTrainer  # noqa: E402

__all__ = ["GNIVOConfig", "GNIVOTrainer", "RewardFunctionError", "VIMPOConfig", "VIMPOTrainer", "__version__"]
