"""Build script. The pure-Python package needs nothing from here; the compiled
extension (resnet_fused._C) is added by the native backend."""
from setuptools import setup

setup()
