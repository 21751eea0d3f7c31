"""The emulated Xen platform's machine side: the grant/event broker (server) and `pvback sim`, which runs it with
pvback's xenstored.  Backends reach it through `backends.platform.emulated`; guests through `backends.guests`."""
