"""verl-grto: GRTO / B-GRTO for verl.

Importing this package does not touch verl; verl imports `verl_grto.registration`
through its `verl.plugins` entry point, which registers everything the plugin adds.
"""

__version__ = "0.1.0"
