"""perm-lite: fast, local PERM empathy scores (resonation, expression, reception, bystander)."""

from perm_lite.errors import ModelError, OptionError, PermError, ProviderError
from perm_lite.explain import Contribution, Explanation
from perm_lite.guardrail import Guardrail, Verdict
from perm_lite.records import Dialogue, RecordError, Turn
from perm_lite.reward import Reward
from perm_lite.scorer import Result, Scorer

__version__ = "0.6.0"
__all__ = [
    "Scorer",
    "Result",
    "Reward",
    "Explanation",
    "Contribution",
    "Dialogue",
    "Turn",
    "PermError",
    "ModelError",
    "ProviderError",
    "OptionError",
    "RecordError",
    "Guardrail",
    "Verdict",
    "__version__",
]
