"""fedftg on Flower (needs `fedftg[flower]`).

For your own Flower app: `FTGStrategy` wraps a Flower strategy (FedAvg, FedProx, FedAdam,
...) and runs FedFTG's server step after its aggregation; `label_histogram_mod` makes a
ClientApp send the label counts the step needs (docs/flower.md); `FTGSettings` and
`FedDFSettings` are the steps' settings. fedftg's own ClientApp, ServerApp and
`MethodStrategy` live in `client_app`, `server_app` and `strategy`.
"""

from fedftg.flower.ftg import FTGStrategy, plugin_settings, run_config_settings
from fedftg.flower.mods import add_label_histogram, label_histogram_mod
from fedftg.plugins.specs.feddf import FedDFSettings
from fedftg.plugins.specs.ftg import FTGSettings

__all__ = [
    "FTGSettings",
    "FTGStrategy",
    "FedDFSettings",
    "add_label_histogram",
    "label_histogram_mod",
    "plugin_settings",
    "run_config_settings",
]
