"""The lab: guest kernels, the initramfs and lab VMs that vmshield boots itself."""
