"""The machine edgetok runs on: what this one has (local.py), and a catalog of device profiles
shipped as data (catalog.py, profiles.json), each number with its public source."""

from edgetok.devices.catalog import DeviceProfile, catalog, load_profile
from edgetok.devices.local import LocalDevice, detect

__all__ = ["DeviceProfile", "LocalDevice", "catalog", "detect", "load_profile"]
