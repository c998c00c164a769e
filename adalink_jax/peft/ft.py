"""Full fine-tuning: every parameter trains; nothing is added to the model."""
from adalink_jax.peft import registry

METHOD = registry.Method(
    name='ft',
    summary='full fine-tuning (every parameter trains)',
    trains_all=True,
)
