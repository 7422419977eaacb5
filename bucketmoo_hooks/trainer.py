"""``transformers.Trainer`` integration: install bucket-level MOO when training starts.

Needs the optional dependency ``transformers`` (``pip install "bucketmoo_hooks[transformers]"``)::

    from bucketmoo_hooks import BucketMOOState
    from bucketmoo_hooks.trainer import BucketMOOCallback

    state = BucketMOOState(objective_of_rank=["en", "de", "ja", "ar"], weighting="mgda")
    trainer = Trainer(model=model, args=args, train_dataset=this_ranks_language)
    trainer.add_callback(BucketMOOCallback(trainer, state))
    trainer.train()
"""

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bucketmoo_hooks.trainer needs transformers: pip install 'bucketmoo_hooks[transformers]'"
    ) from error

from ._install import Installation, install_bucket_moo
from ._state import BucketMOOState

__all__ = ["BucketMOOCallback"]


class BucketMOOCallback(TrainerCallback):
    """Installs bucket-level MOO on the model a ``Trainer`` trains, at ``on_train_begin``.

    The Trainer wraps the model (``Accelerator.prepare``: DDP, FSDP1 or FSDP2) inside
    ``train()``, after the callbacks are built, and hands callbacks the unwrapped model; so the
    callback keeps the trainer and installs on ``trainer.model_wrapped`` with
    :func:`bucketmoo_hooks.install_bucket_moo` once it exists, before the first backward. A later
    ``train()`` on the same wrapped model keeps the installed hook.

    Args:
        trainer: The ``transformers.Trainer`` that will train.
        state: The hook state (one objective per process, e.g. its language).

    Attributes:
        installation: What was installed (:class:`~bucketmoo_hooks.Installation`: the engine,
            and the FSDP units), ``None`` before training.
    """

    def __init__(self, trainer: Trainer, state: BucketMOOState) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if not isinstance(state, BucketMOOState):
            raise TypeError(f"state must be a BucketMOOState, got {type(state).__name__}")
        self.trainer = trainer
        self.state = state
        self.installation: Installation | None = None
        self._installed_on: object = None

    def on_train_begin(self, args, state, control, **kwargs):  # Trainer's signature
        model = self.trainer.model_wrapped
        if model is not self._installed_on:
            self.installation = install_bucket_moo(model, self.state)
            self._installed_on = model
