//! Running as root: allowed with one warning that names the risk, or refused when the
//! operator asks for that (`--refuse-root`, which the packaged units pass).

/// Running as root was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to run as root (--refuse-root): run {binary} as an unprivileged user, such as the \
     packaged `ipevent` user"
)]
pub struct RootRefused {
    binary: &'static str,
}

/// What `binary` does about its user: `Ok` for any user but root; as root, an error when
/// `refuse` is set and otherwise one warning.
pub fn check_root(binary: &'static str, refuse: bool) -> Result<(), RootRefused> {
    check_uid(binary, crate::sys::effective_uid(), refuse)
}

fn check_uid(binary: &'static str, uid: u32, refuse: bool) -> Result<(), RootRefused> {
    if uid != 0 {
        return Ok(());
    }
    if refuse {
        return Err(RootRefused { binary });
    }
    log::warn!(
        "running as root: a mistyped --data-dir or a link planted in the data dir can make \
         {binary} create or overwrite files anywhere on this host. Run it as an unprivileged \
         user (the packages run it as the `ipevent` user), or pass --refuse-root \
         (IPEVENT_REFUSE_ROOT=true) to refuse root"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_only_when_asked() {
        assert_eq!(check_uid("x", 1000, true), Ok(()));
        assert_eq!(check_uid("x", 1000, false), Ok(()));
        assert_eq!(check_uid("x", 0, false), Ok(()));
        let refused = check_uid("ipevent-api", 0, true).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "refusing to run as root (--refuse-root): run ipevent-api as an unprivileged user, \
             such as the packaged `ipevent` user"
        );
    }
}
