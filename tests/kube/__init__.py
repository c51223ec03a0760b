"""Test support: a Kubernetes API emulator, a process kubelet and real kubectl/helm binaries.

Not shipped with the operator. See README.md in this folder.
"""
