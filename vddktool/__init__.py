"""vddktool: serve VMware virtual disks over NBD, like nbdkit's VDDK plugin."""

__version__ = "0.1.0"
