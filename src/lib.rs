//! chainvault: backup repository daemon for virtual machine disks.
