"""Test-wide settings: 8 fake CPU devices for the sharding tests, quiet TensorFlow."""
import os

# Must be set before jax initialises its backends; every test sees 8 CPU devices.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
