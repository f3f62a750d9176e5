# Kept for old setuptools (RHEL 8's Python 3.6); everything is in setup.cfg.
from setuptools import setup

setup()
