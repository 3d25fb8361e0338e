"""Runtimes that run workspace VMs from stored images (QEMU now; Tart and Incus later)."""
