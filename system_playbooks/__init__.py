"""The kernel's services as plug-ins: each folder holds a manifest and its implementation."""
