//! The real classifier loaded for BPF_PROG_TEST_RUN: in a private namespace whose `lo` is
//! the WAN side (ifindex 1) and a veth the LAN side (a test run needs a real device for the
//! ifindex that selects the direction). The calling thread enters that namespace.

use std::path::Path;

use shaper_user::{compile, config::Policy, kernel::bpf};

use crate::Netns;

pub struct Rig {
    pub policy: Policy,
    pub obj: aya::Ebpf,
    pub wan: u32,
    pub lan: u32,
    // Last: the namespace goes after the program that runs in it.
    _ns: Netns,
}

/// Parses `policy_text`, loads the classifier through the verifier with its maps filled,
/// and moves the calling thread into the rig's namespace.
pub fn load(policy_text: &str) -> Rig {
    let ns = Netns::new("rig").expect("netns");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .expect("veth");
    for l in ["v0", "v1"] {
        ns.ip(&["link", "set", l, "up"]).expect("link up");
    }
    ns.enter_current_thread().expect("setns");
    let c = std::ffi::CString::new("v0").expect("name");
    // SAFETY: NUL-terminated name.
    let lan = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(lan > 1, "veth ifindex");
    let policy = shaper_user::config::parse(Path::new("rig.toml"), policy_text).expect("policy");
    let maps = compile::maps(&compile::plan(&policy, None));
    let flags =
        shaper_common::CFG_WAN_L2 | shaper_common::CFG_LAN_L2 | shaper_common::CFG_REMARK_WAN;
    let obj = bpf::load(&maps, 1, lan, flags).expect("classifier loads and passes the verifier");
    Rig {
        policy,
        obj,
        wan: 1,
        lan,
        _ns: ns,
    }
}

impl Rig {
    /// The HTB class id of the policy class `name`.
    pub fn class_of(&self, name: &str) -> u32 {
        let i = self
            .policy
            .classes
            .iter()
            .position(|c| c.name == name)
            .expect("class");
        compile::classid_of(&self.policy, i)
    }

    /// `skb->priority` the classifier leaves on `frame`, upload or download.
    pub fn run(&mut self, frame: &[u8], up: bool) -> u32 {
        let ifindex = if up { self.wan } else { self.lan };
        bpf::test_run(&mut self.obj, frame, ifindex, 1)
            .expect("test run")
            .priority
    }
}
