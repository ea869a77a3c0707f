"""localsgd-ds: local SGD and post-local SGD as a hook on a DeepSpeed engine.

Implements the methods studied in "Trade-offs of Local SGD at Scale" (Gonzalez Ortiz, Frankle, Rabbat,
Morcos, Ballas, 2021): mSGD, local SGD (K workers average their weights every H steps), post-local SGD
(mSGD until epoch T, local SGD after), and slow momentum (SlowMo) at each sync. Configuration is a
``local_sgd`` block in the DeepSpeed JSON; the training loop stays DeepSpeed's own::

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                              config="ds_configs/<file>.json")
    local_sgd = localsgd_ds.attach(engine, steps_per_epoch=len(train_loader))
    for epoch in range(epochs):
        for images, labels in train_loader:
            engine.backward(criterion(engine(images), labels))
            engine.step()                      # averages here when a sync is due
"""

from localsgd_ds.config import (
    ConfigError,
    LocalSGDConfig,
    SlowMoConfig,
    check_engine,
)
from localsgd_ds.hook import LocalSGD, attach
from localsgd_ds.stats import CommStats

__all__ = [
    "CommStats",
    "ConfigError",
    "LocalSGD",
    "LocalSGDConfig",
    "SlowMoConfig",
    "attach",
    "check_engine",
]
