"""The VDDK engine: VMware's libvixDiskLib bound with ctypes.

abi.py       the C ABI: structures, constants, prototypes, callbacks
library.py   finding and loading the library; every call is timed
reexec.py    restarting once with VDDK's directory on LD_LIBRARY_PATH
settings.py  checking the parameters; how a failed open is told
backend.py   VddkBackend and VddkEngine, what the server talks to
stats.py     -D vddk.stats=1
wildcard.py  export=WILDCARD matching
"""
