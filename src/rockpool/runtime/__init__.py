"""Runtimes that run workspace VMs from stored images: QEMU (Linux), Tart (macOS)."""
