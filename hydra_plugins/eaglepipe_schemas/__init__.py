"""Registers eaglepipe's dataclass schema with Hydra's ConfigStore.

Hydra (and DVC's Hydra integration, used by `dvc exp run -S`) imports every
package under the `hydra_plugins` namespace, so the schema is active whenever
conf/ is composed: unknown keys and wrong types are rejected.
"""
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from hydra.core.config_store import ConfigStore  # noqa: E402

from eaglepipe.config.schema import Config  # noqa: E402

ConfigStore.instance().store(name="eaglepipe_schema", node=Config)
