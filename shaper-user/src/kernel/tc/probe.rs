//! Probing which qdisc kinds this kernel can create, in a throw-away network namespace.

use super::*;

/// Report which qdisc kinds this kernel can create, e.g.
/// `probe_qdisc_kinds(&["htb", "fq_codel", "cake"])`.
///
/// Runs in a dedicated OS thread that moves itself (only itself) into a new,
/// empty network namespace with `unshare(CLONE_NEWNET)`, brings `lo` up,
/// and tries to add each kind as root qdisc on `lo` (then deletes it), so no
/// real interface is touched. The kernel autoloads qdisc modules on create.
/// A kind counts as available if creation succeeds, or fails with anything
/// but ENOENT ("unknown qdisc kind"), since some kinds need options this
/// probe does not know. If the namespace cannot be created (no
/// CAP_SYS_ADMIN) every kind is reported unavailable and an error is logged.
pub async fn probe_qdisc_kinds(kinds: &[&str]) -> Vec<(String, bool)> {
    let owned: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    let fallback: Vec<(String, bool)> = owned.iter().map(|k| (k.clone(), false)).collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("tc-probe".into())
        .spawn(move || {
            let r = probe_thread(&owned);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        log::error!("tc probe: cannot spawn probe thread: {e}");
        return fallback;
    }
    match rx.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            log::error!("tc probe: {e}; reporting all kinds as unavailable");
            fallback
        }
        Err(_) => {
            log::error!("tc probe: probe thread ended without a result");
            fallback
        }
    }
}

fn probe_thread(kinds: &[String]) -> Result<Vec<(String, bool)>, String> {
    // unshare only changes this thread's namespace membership; the thread is ours and
    // ends when the probe is done, which drops the netns.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET) failed: {}", std::io::Error::from(e)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot build probe runtime: {e}"))?;
    rt.block_on(async move {
        let tc = Tc::connect().await.map_err(|e| e.to_string())?;
        let lo = tc
            .ifindex("lo")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no lo in the new namespace".to_string())?;
        let mut up = LinkMessage::default();
        up.header.index = lo;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        if let Err(NlFail::Errno { errno, .. }) = tc.ack(RouteNetlinkMessage::SetLink(up), 0).await
        {
            log::debug!("tc probe: bringing lo up failed with errno {errno}");
        }
        let mut out = Vec::with_capacity(kinds.len());
        for kind in kinds {
            let ok = probe_one(&tc, lo, kind).await;
            log::debug!(
                "tc probe: qdisc kind {kind}: {}",
                if ok { "available" } else { "missing" }
            );
            out.push((kind.clone(), ok));
        }
        Ok(out)
    })
}

async fn probe_one(tc: &Tc, lo: u32, kind: &str) -> bool {
    let handle = tc_handle(0x7a11, 0);
    let Ok(mut m) = tc_msg(lo, handle, TC_H_ROOT) else {
        return false;
    };
    m.attributes.push(TcAttribute::Kind(kind.to_string()));
    if let Some(opts) = enc::probe_options(kind) {
        m.attributes.push(options_attr(opts));
    }
    let res = tc
        .ack(
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await;
    let ok = match res {
        Ok(()) => true,
        Err(NlFail::Errno { errno, ext_ack }) => {
            log::debug!(
                "tc probe: creating {kind} failed: {}",
                describe(TcOp::AddRoot, errno, ext_ack.as_deref())
            );
            errno != libc::ENOENT
        }
        Err(NlFail::Transport(t)) => {
            log::debug!("tc probe: {kind}: {t}");
            false
        }
    };
    if ok {
        if let Ok(del) = tc_msg(lo, 0, TC_H_ROOT) {
            let _ = tc
                .ack(RouteNetlinkMessage::DelQueueDiscipline(del), 0)
                .await;
        }
    }
    ok
}
