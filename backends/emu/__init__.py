"""The emulated Xen platform's machinery: the grant/event broker, the guest process model, test frontends
and the sim process that runs xenstored + broker together."""
