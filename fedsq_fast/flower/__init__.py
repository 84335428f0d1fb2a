"""FedSQ on Flower (``pip install -e ".[flower]"``): ServerApp/ClientApp, a Flower strategy
whose aggregation is the engine's, SecAgg+ secure aggregation (``secagg = true``), and state-dict <-> ArrayRecord conversion (bf16 included).
See docs/flower.md."""
try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError('fedsq_fast.flower needs Flower: pip install -e ".[flower]" (flwr==1.41.0)') from e

from .arrays import RAW_STYPE, arrays_to_state, record_bytes, state_to_arrays  # noqa: F401,E402
from .strategy import FedSQStrategy, ReplyRejected, engine_strategy, reply_info, reply_state  # noqa: F401,E402
from .transport import GridTransport  # noqa: F401,E402
from .secagg import SecAggTransport  # noqa: F401,E402
