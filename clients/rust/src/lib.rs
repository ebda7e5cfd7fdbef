//! gtar-logd client (see issue 4).
