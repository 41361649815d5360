"""Node agent and kubelet device-plugin servers (imported as hostdev.deviceplugin)."""
