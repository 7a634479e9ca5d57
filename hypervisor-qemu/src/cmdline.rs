//! QEMU's command line, built from a typed description. Pure: no I/O, unit-tested.
//!
//! QEMU opens no file of the sandbox by path: the console log and the disks reach it as fds in
//! fd sets (`-add-fd`, then `/dev/fdset/N` where a path is expected), so they can stay
//! root-owned 0600 in a 0700 directory while QEMU runs unprivileged or chrooted.

use std::fmt::Write as _;
use std::path::PathBuf;

use hypervisor::MacAddress;

/// Kernel parameters every guest gets: serial console, reboot by triple fault, no hang on
/// panic (QEMU exits instead, and `wait_exit` reports it).
pub const BASE_KERNEL_PARAMS: &str = "console=ttyS0 reboot=t panic=-1";

/// Under TCG the microvm guest's TSC calibration can hang; pinning the early TSC avoids it.
pub const MICROVM_TCG_KERNEL_PARAMS: &str = "tsc_early_khz=2000000";

/// Kernel parameters that cut the guest's boot work, as Kata's guests get them (the
/// backend's default [`crate::QemuOptions::boot_params`]): no probing of the PS/2 aux port,
/// multiplexer and PnP, no crypto self-tests, the TSC trusted without the timer check or the
/// clocksource watchdog, one legacy UART, SMP lock prefixes left alone. Kata's `quiet` is
/// not among them: under TCG it saved nothing measurable here, and the console log keeps
/// the kernel's messages.
pub const LEAN_KERNEL_PARAMS: &str = "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
     cryptomgr.notests tsc=reliable no_timer_check noreplace-smp 8250.nr_uarts=1";

/// qboot, the minimal firmware Debian's `qemu-system-data` ships: it loads the kernel sooner
/// than SeaBIOS, QEMU's default, and leaves PCI hotplug on q35 working.
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// QEMU machine types this backend supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// PCIe machine; devices on PCI, hotplug through free `pcie-root-port`s.
    Q35,
    /// Minimal machine; devices on virtio-mmio, no hotplug.
    Microvm,
}

impl Machine {
    /// Parses a Kata `machine_type` value.
    pub fn parse(s: &str) -> Option<Machine> {
        match s {
            "q35" | "pc-q35" => Some(Machine::Q35),
            "microvm" => Some(Machine::Microvm),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }

    fn virtio(self, base: &str) -> String {
        match self {
            Machine::Q35 => format!("{base}-pci"),
            Machine::Microvm => format!("{base}-device"),
        }
    }
}

/// The resolved accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Where a device sits on q35's PCI topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PciPlace {
    /// Directly on `pcie.0` at this slot.
    Root(u8),
    /// In the root port with this id, itself at `port_slot` on `pcie.0`.
    Port {
        /// Root port id.
        port: String,
        /// The root port's slot.
        port_slot: u8,
    },
}

impl PciPlace {
    /// QEMU `bus=..,addr=..` properties.
    pub fn props(&self) -> String {
        match self {
            PciPlace::Root(slot) => format!("bus=pcie.0,addr={slot:#x}"),
            PciPlace::Port { port, .. } => format!("bus={port},addr=0x0"),
        }
    }

    /// Kata-style PCI path the guest sees (`03`, or `1c/00` behind a root port).
    pub fn pci_path(&self) -> String {
        match self {
            PciPlace::Root(slot) => format!("{slot:02x}"),
            PciPlace::Port { port_slot, .. } => format!("{port_slot:02x}/00"),
        }
    }
}

/// A network device on the command line.
#[derive(Debug, Clone)]
pub struct NicArgs {
    /// Device id; the netdev is `<id>`, the device `dev-<id>`.
    pub id: String,
    /// Guest MAC.
    pub mac: MacAddress,
    /// TAP queue fd numbers in the QEMU process.
    pub tap_fds: Vec<i32>,
    /// vhost-net fd numbers, one per queue, or empty for userspace virtio-net.
    pub vhost_fds: Vec<i32>,
    /// Virtqueue size.
    pub queue_size: Option<u16>,
    /// Guest MTU hint.
    pub mtu: Option<u32>,
    /// q35 only.
    pub place: Option<PciPlace>,
}

/// A block device on the command line.
#[derive(Debug, Clone)]
pub struct BlockArgs {
    /// Device id; the block node is `<id>`, the device `dev-<id>`.
    pub id: String,
    /// Host path.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// q35 only.
    pub place: Option<PciPlace>,
}

/// A shared filesystem (virtio-fs) on the command line.
#[derive(Debug, Clone)]
pub struct SharedFsArgs {
    /// Device id; the chardev is `chr-<id>`, the device `dev-<id>`.
    pub id: String,
    /// fd number, in QEMU, of the socket connected to the share's virtiofsd.
    pub socket_fd: i32,
    /// The tag the guest mounts it by.
    pub tag: String,
    /// q35 only.
    pub place: Option<PciPlace>,
}

/// How the agent is reached.
#[derive(Debug, Clone)]
pub enum AgentArgs {
    /// virtio-serial port `agent.0` on a listening Unix socket.
    Serial {
        /// fd number of the listening socket in QEMU.
        fd: i32,
    },
    /// vhost-vsock with this guest CID.
    Vsock {
        /// Guest CID.
        cid: u32,
    },
}

/// A VM's part in a template ([`hypervisor::Boot`]): guest RAM in a file, a `vmgenid`
/// device, and for a clone an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateArgs {
    /// The template's source: RAM in `mem_path`, mapped shared (the template's memory file).
    Source {
        /// The memory file as QEMU opens it (`/proc/self/fd/N`).
        mem_path: PathBuf,
    },
    /// A clone: RAM mapped private (copy-on-write) from `mem_path`, a new generation id, and
    /// `-incoming defer` (the state comes over QMP `migrate-incoming`).
    Clone {
        /// The template's memory file as QEMU opens it (`/proc/self/fd/N`).
        mem_path: PathBuf,
        /// The clone's `vmgenid` GUID.
        vmgenid: String,
    },
}

/// Everything the command line is built from.
#[derive(Debug, Clone)]
pub struct CmdlineSpec {
    /// VM name (the sandbox id).
    pub name: String,
    /// Machine.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Kernel.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters.
    pub kernel_params: Vec<String>,
    /// Firmware (`-bios`); `None`: QEMU's default for the machine.
    pub firmware: Option<PathBuf>,
    /// Under TCG, the size of the translation buffer in MiB (`-accel tcg,tb-size=N`; QEMU's
    /// default reserves 1 GiB, of which a boot fills about 48 MiB, all of it resident).
    pub tb_size_mib: Option<u32>,
    /// A virtio-balloon device with free page reporting: the guest hands pages it frees back
    /// to the host (Kata's `reclaim_guest_freed_memory`).
    pub free_page_reporting: bool,
    /// fd number, in QEMU, of the listening Unix socket of the QMP monitor.
    pub qmp_fd: i32,
    /// File the serial console is written to (a [`fdset_path`] when passed as an fd).
    pub console_log: PathBuf,
    /// fds passed in, grouped in fd sets: `(set, fd number in QEMU)`.
    pub fdsets: Vec<(u32, i32)>,
    /// The seccomp filter (`-sandbox` value).
    pub seccomp: Option<String>,
    /// The directory QEMU chroots into once started.
    pub chroot: Option<PathBuf>,
    /// Agent channel.
    pub agent: AgentArgs,
    /// Cold-plugged NICs.
    pub nics: Vec<NicArgs>,
    /// Cold-plugged disks.
    pub blocks: Vec<BlockArgs>,
    /// Free root ports for hotplug (q35): `(id, slot)`.
    pub root_ports: Vec<(String, u8)>,
    /// Guest RAM from a shared memfd (`memory-backend-memfd,share=on`), as vhost-user
    /// devices (virtio-fs) need; set whenever shared filesystems are configured, so a share
    /// can be hot-plugged later.
    pub shared_memory: bool,
    /// Cold-plugged shared filesystems.
    pub shares: Vec<SharedFsArgs>,
    /// The VM's part in a template, if any (never with `shared_memory`).
    pub template: Option<TemplateArgs>,
}

impl CmdlineSpec {
    /// The kernel command line.
    pub fn kernel_append(&self) -> String {
        let mut s = String::from(BASE_KERNEL_PARAMS);
        if self.machine == Machine::Microvm && self.accel == Accel::Tcg {
            s.push(' ');
            s.push_str(MICROVM_TCG_KERNEL_PARAMS);
        }
        for p in &self.kernel_params {
            s.push(' ');
            s.push_str(p);
        }
        s
    }

    /// The argument vector, without the binary.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        // QEMU refuses `-accel` beside `-machine accel=`: the accelerator is given once.
        let tb_size = self.tb_size_mib.filter(|_| self.accel == Accel::Tcg);
        let accel = match tb_size {
            Some(_) => String::new(),
            None => format!(",accel={}", self.accel.as_str()),
        };
        let mut machine = match self.machine {
            Machine::Q35 => format!("q35{accel}"),
            // isa-serial for the console; ACPI describes the virtio-mmio devices to the guest.
            Machine::Microvm => format!("microvm{accel},isa-serial=on,rtc=on,pit=on,pic=on"),
        };
        if self.shared_memory || self.template.is_some() {
            machine.push_str(",memory-backend=mem");
        }
        push(&["-name", &format!("sandbox-{}", self.name)]);
        if let Some(filter) = &self.seccomp {
            push(&["-sandbox", filter]);
        }
        for (set, fd) in &self.fdsets {
            push(&["-add-fd", &format!("fd={fd},set={set}")]);
        }
        if let Some(dir) = &self.chroot {
            push(&["-chroot", &dir.display().to_string()]);
        }
        push(&["-machine", &machine]);
        if let Some(mib) = tb_size {
            push(&["-accel", &format!("tcg,tb-size={mib}")]);
        }
        if let Some(firmware) = &self.firmware {
            push(&["-bios", &firmware.display().to_string()]);
        }
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-m", &format!("{}M", self.memory_mib)]);
        if self.shared_memory {
            push(&[
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ),
            ]);
        }
        match &self.template {
            Some(TemplateArgs::Source { mem_path }) => {
                push(&["-object", &memory_file(self.memory_mib, mem_path, true)])
            }
            Some(TemplateArgs::Clone { mem_path, .. }) => {
                push(&["-object", &memory_file(self.memory_mib, mem_path, false)])
            }
            None => {}
        }
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        push(&["-display", "none"]);
        push(&["-serial", &format!("file:{}", self.console_log.display())]);
        push(&[
            "-chardev",
            &format!("socket,id=qmp,fd={},server=on,wait=off", self.qmp_fd),
        ]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        push(&["-kernel", &self.kernel.display().to_string()]);
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        push(&["-append", &self.kernel_append()]);

        for (id, slot) in &self.root_ports {
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={id},bus=pcie.0,addr={slot:#x},chassis={slot},slot={slot}"
                ),
            ]);
        }

        match &self.agent {
            AgentArgs::Serial { fd } => {
                push(&["-device", &self.machine.virtio("virtio-serial")]);
                push(&[
                    "-chardev",
                    &format!("socket,id=agent,fd={fd},server=on,wait=off"),
                ]);
                push(&["-device", "virtserialport,chardev=agent,name=agent.0"]);
            }
            AgentArgs::Vsock { cid } => {
                push(&[
                    "-device",
                    &format!("{},guest-cid={cid}", self.machine.virtio("vhost-vsock")),
                ]);
            }
        }

        match &self.template {
            Some(TemplateArgs::Source { .. }) => {
                push(&["-device", "vmgenid,id=vmgenid0,guid=auto"]);
            }
            Some(TemplateArgs::Clone { vmgenid, .. }) => {
                push(&["-device", &format!("vmgenid,id=vmgenid0,guid={vmgenid}")]);
                push(&["-incoming", "defer"]);
            }
            None => {}
        }

        for nic in &self.nics {
            push(&["-netdev", &netdev_arg(nic)]);
            push(&["-device", &self.nic_device_arg(nic)]);
        }
        for b in &self.blocks {
            push(&["-blockdev", &blockdev_arg(b)]);
            let mut dev = format!(
                "{},id=dev-{},drive={}",
                self.machine.virtio("virtio-blk"),
                b.id,
                b.id
            );
            if let Some(place) = &b.place {
                let _ = write!(dev, ",{}", place.props());
            }
            push(&["-device", &dev]);
        }
        for fs in &self.shares {
            push(&[
                "-chardev",
                &format!("socket,id=chr-{},fd={}", fs.id, fs.socket_fd),
            ]);
            let mut dev = format!(
                "{},id=dev-{},chardev=chr-{},tag={}",
                self.machine.virtio("vhost-user-fs"),
                fs.id,
                fs.id,
                fs.tag.replace(',', ",,")
            );
            if let Some(place) = &fs.place {
                let _ = write!(dev, ",{}", place.props());
            }
            push(&["-device", &dev]);
        }
        if self.free_page_reporting {
            // Last and without an address: on q35 it takes a slot of pcie.0 that no device
            // placed above claims (hotplug goes into root ports, never there).
            push(&[
                "-device",
                &format!(
                    "{},id=balloon0,free-page-reporting=on",
                    self.machine.virtio("virtio-balloon")
                ),
            ]);
        }
        a
    }

    fn nic_device_arg(&self, nic: &NicArgs) -> String {
        let mut dev = format!(
            "{},id=dev-{},netdev={},mac={}",
            self.machine.virtio("virtio-net"),
            nic.id,
            nic.id,
            nic.mac
        );
        let _ = write!(
            dev,
            "{}",
            nic_props(self.machine, nic.tap_fds.len(), nic.queue_size, nic.mtu)
        );
        if let Some(place) = &nic.place {
            let _ = write!(dev, ",{}", place.props());
        }
        dev
    }
}

/// virtio-net properties shared by the command line and hotplug. Multi-queue needs `mq=on`;
/// on PCI also `vectors=2N+2` (an MSI-X vector per queue, plus config and control).
/// virtio-mmio (`virtio-net-device`, microvm) has no MSI-X and no `vectors` property: QEMU
/// refuses the device if it is given.
///
/// On PCI the NIC gets no option ROM (`romfile=`): the guest boots its kernel directly and
/// never network-boots, and a chrooted QEMU could not read the ROM file from
/// `/usr/share/qemu` when the NIC is hot-plugged.
pub fn nic_props(
    machine: Machine,
    queues: usize,
    queue_size: Option<u16>,
    mtu: Option<u32>,
) -> String {
    let mut s = String::new();
    if machine == Machine::Q35 {
        s.push_str(",romfile=");
    }
    if queues > 1 {
        s.push_str(",mq=on");
        if machine == Machine::Q35 {
            let _ = write!(s, ",vectors={}", 2 * queues + 2);
        }
    }
    if let Some(q) = queue_size {
        let _ = write!(s, ",rx_queue_size={q},tx_queue_size={q}");
    }
    if let Some(m) = mtu {
        let _ = write!(s, ",host_mtu={m}");
    }
    s
}

/// `-netdev tap,...` for pre-opened fds. `fds=` is colon-separated and must not be combined
/// with `queues=`, `fd=` or `ifname=`; `vhost=on` only with vhost fds.
fn netdev_arg(nic: &NicArgs) -> String {
    let join = |fds: &[i32]| {
        fds.iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut s = format!("tap,id={},fds={}", nic.id, join(&nic.tap_fds));
    if nic.vhost_fds.is_empty() {
        s.push_str(",vhost=off");
    } else {
        let _ = write!(s, ",vhost=on,vhostfds={}", join(&nic.vhost_fds));
    }
    s
}

fn blockdev_arg(b: &BlockArgs) -> String {
    // QEMU's option parser takes ',,' as a literal comma inside a value.
    let path = b.path.display().to_string().replace(',', ",,");
    format!(
        "driver=raw,node-name={},read-only={},file.driver=file,file.filename={},file.read-only={}",
        b.id,
        on_off(b.read_only),
        path,
        on_off(b.read_only)
    )
}

/// `memory-backend-file` for guest RAM in `path`: mapped shared (a template's source, whose
/// pages are the template) or private (a clone: copy-on-write over the template's pages).
fn memory_file(memory_mib: u32, path: &std::path::Path, share: bool) -> String {
    format!(
        "memory-backend-file,id=mem,size={memory_mib}M,mem-path={},share={}",
        path.display().to_string().replace(',', ",,"),
        on_off(share)
    )
}

/// The path under which QEMU opens an fd of fd set `set`.
pub fn fdset_path(set: u32) -> PathBuf {
    PathBuf::from(format!("/dev/fdset/{set}"))
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CmdlineSpec {
        CmdlineSpec {
            name: "s1".into(),
            machine: Machine::Q35,
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initramfs.img".into()),
            kernel_params: vec!["agent.port=1024".into()],
            firmware: None,
            tb_size_mib: None,
            free_page_reporting: false,
            qmp_fd: 3,
            console_log: "/run/s1/console.log".into(),
            fdsets: vec![],
            seccomp: None,
            chroot: None,
            agent: AgentArgs::Serial { fd: 4 },
            nics: vec![],
            blocks: vec![],
            root_ports: vec![("rp0".into(), 0x1c)],
            shared_memory: false,
            shares: vec![],
            template: None,
        }
    }

    #[test]
    fn a_template_source_has_its_ram_in_a_shared_file_and_a_vmgenid() {
        let mut s = spec();
        s.template = Some(TemplateArgs::Source {
            mem_path: "/proc/self/fd/9".into(),
        });
        let a = s.args();
        assert_eq!(after(&a, "-machine"), ["q35,accel=tcg,memory-backend=mem"]);
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/9,share=on"]
        );
        assert!(after(&a, "-device").contains(&"vmgenid,id=vmgenid0,guid=auto"));
        assert!(after(&a, "-incoming").is_empty());
    }

    #[test]
    fn a_clone_maps_the_template_private_with_a_new_vmgenid_and_waits_for_its_state() {
        let mut s = spec();
        s.template = Some(TemplateArgs::Clone {
            mem_path: "/proc/self/fd/9".into(),
            vmgenid: "9b1c8b5e-0c0a-4f7e-a1d2-3c4d5e6f7a8b".into(),
        });
        let a = s.args();
        assert_eq!(after(&a, "-machine"), ["q35,accel=tcg,memory-backend=mem"]);
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/9,share=off"]
        );
        assert!(after(&a, "-device")
            .contains(&"vmgenid,id=vmgenid0,guid=9b1c8b5e-0c0a-4f7e-a1d2-3c4d5e6f7a8b"));
        assert_eq!(after(&a, "-incoming"), ["defer"]);
    }

    #[test]
    fn shares_get_shared_memory_and_a_vhost_user_fs_device_on_a_connected_socket() {
        let mut s = spec();
        assert!(!s.args().iter().any(|a| a.contains("memfd")));
        s.shared_memory = true;
        s.shares = vec![SharedFsArgs {
            id: "fs0".into(),
            socket_fd: 7,
            tag: "kataShared".into(),
            place: Some(PciPlace::Root(3)),
        }];
        let a = s.args();
        assert_eq!(after(&a, "-machine"), ["q35,accel=tcg,memory-backend=mem"]);
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert!(after(&a, "-chardev").contains(&"socket,id=chr-fs0,fd=7"));
        assert!(after(&a, "-device").contains(
            &"vhost-user-fs-pci,id=dev-fs0,chardev=chr-fs0,tag=kataShared,bus=pcie.0,addr=0x3"
        ));
        s.machine = Machine::Microvm;
        s.shares[0].place = None;
        let a = s.args();
        assert!(after(&a, "-device")
            .contains(&"vhost-user-fs-device,id=dev-fs0,chardev=chr-fs0,tag=kataShared"));
        assert!(after(&a, "-machine")[0].ends_with(",memory-backend=mem"));
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_tcg_translation_buffer_size_moves_the_accelerator_to_accel() {
        let mut s = spec();
        s.tb_size_mib = Some(32);
        let a = s.args();
        assert_eq!(after(&a, "-machine"), ["q35"]);
        assert_eq!(after(&a, "-accel"), ["tcg,tb-size=32"]);
        s.machine = Machine::Microvm;
        assert_eq!(
            after(&s.args(), "-machine"),
            ["microvm,isa-serial=on,rtc=on,pit=on,pic=on"]
        );
        // Under KVM there is no translation buffer: the option is left out.
        s.machine = Machine::Q35;
        s.accel = Accel::Kvm;
        let a = s.args();
        assert_eq!(after(&a, "-machine"), ["q35,accel=kvm"]);
        assert!(after(&a, "-accel").is_empty());
    }

    #[test]
    fn firmware_is_passed_with_bios_and_is_absent_when_unset() {
        let mut s = spec();
        assert!(after(&s.args(), "-bios").is_empty());
        s.firmware = Some(QBOOT.into());
        assert_eq!(after(&s.args(), "-bios"), [QBOOT]);
    }

    #[test]
    fn free_page_reporting_adds_a_balloon_after_every_placed_device() {
        let mut s = spec();
        assert!(!s.args().iter().any(|a| a.contains("balloon")));
        s.free_page_reporting = true;
        s.blocks.push(BlockArgs {
            id: "blk0".into(),
            path: "/img/a.img".into(),
            read_only: true,
            place: Some(PciPlace::Root(2)),
        });
        let args = s.args();
        let dev = after(&args, "-device");
        assert_eq!(
            dev.last(),
            Some(&"virtio-balloon-pci,id=balloon0,free-page-reporting=on")
        );
        s.machine = Machine::Microvm;
        assert!(after(&s.args(), "-device")
            .contains(&"virtio-balloon-device,id=balloon0,free-page-reporting=on"));
    }

    #[test]
    fn q35_under_tcg_has_no_cpu_host_and_no_tsc_param() {
        let s = spec();
        let args = s.args();
        assert_eq!(after(&args, "-machine"), ["q35,accel=tcg"]);
        assert!(after(&args, "-cpu").is_empty());
        assert_eq!(
            s.kernel_append(),
            "console=ttyS0 reboot=t panic=-1 agent.port=1024"
        );
    }

    #[test]
    fn microvm_under_tcg_pins_the_early_tsc() {
        let mut s = spec();
        s.machine = Machine::Microvm;
        assert!(s.kernel_append().contains(MICROVM_TCG_KERNEL_PARAMS));
        s.accel = Accel::Kvm;
        assert!(!s.kernel_append().contains("tsc_early_khz"));
    }

    #[test]
    fn multi_queue_nic_uses_fds_without_queues_and_sets_vectors() {
        let mut s = spec();
        s.nics.push(NicArgs {
            id: "net0".into(),
            mac: MacAddress([2, 0, 0, 0, 0, 1]),
            tap_fds: vec![3, 4],
            vhost_fds: vec![],
            queue_size: None,
            mtu: None,
            place: Some(PciPlace::Root(2)),
        });
        let args = s.args();
        assert_eq!(after(&args, "-netdev"), ["tap,id=net0,fds=3:4,vhost=off"]);
        let dev = after(&args, "-device");
        assert!(dev.contains(
            &"virtio-net-pci,id=dev-net0,netdev=net0,mac=02:00:00:00:00:01,romfile=,mq=on,vectors=6,bus=pcie.0,addr=0x2"
        ), "{dev:?}");
        assert!(!args.iter().any(|a| a.contains("queues=")));
    }

    #[test]
    fn multi_queue_nic_on_microvm_has_mq_but_no_msix_vectors() {
        let mut s = spec();
        s.machine = Machine::Microvm;
        s.root_ports.clear();
        s.nics.push(NicArgs {
            id: "net0".into(),
            mac: MacAddress([2, 0, 0, 0, 0, 1]),
            tap_fds: vec![3, 4],
            vhost_fds: vec![],
            queue_size: None,
            mtu: None,
            place: None,
        });
        let args = s.args();
        assert_eq!(after(&args, "-netdev"), ["tap,id=net0,fds=3:4,vhost=off"]);
        let dev = after(&args, "-device");
        assert!(
            dev.contains(&"virtio-net-device,id=dev-net0,netdev=net0,mac=02:00:00:00:00:01,mq=on"),
            "{dev:?}"
        );
        assert!(!args.iter().any(|a| a.contains("vectors=")), "{args:?}");
        assert_eq!(nic_props(Machine::Microvm, 1, None, None), "");
    }

    #[test]
    fn vhost_is_on_only_with_vhost_fds() {
        let nic = NicArgs {
            id: "net0".into(),
            mac: MacAddress([2, 0, 0, 0, 0, 1]),
            tap_fds: vec![3, 4],
            vhost_fds: vec![5, 6],
            queue_size: Some(256),
            mtu: Some(1400),
            place: None,
        };
        assert_eq!(
            netdev_arg(&nic),
            "tap,id=net0,fds=3:4,vhost=on,vhostfds=5:6"
        );
        assert_eq!(
            nic_props(Machine::Q35, 2, Some(256), Some(1400)),
            ",romfile=,mq=on,vectors=6,rx_queue_size=256,tx_queue_size=256,host_mtu=1400"
        );
    }

    #[test]
    fn root_ports_and_serial_agent_are_declared() {
        let args = spec().args();
        let dev = after(&args, "-device");
        assert!(dev.contains(&"pcie-root-port,id=rp0,bus=pcie.0,addr=0x1c,chassis=28,slot=28"));
        assert!(dev.contains(&"virtserialport,chardev=agent,name=agent.0"));
        let chardevs = after(&args, "-chardev");
        assert!(chardevs.contains(&"socket,id=qmp,fd=3,server=on,wait=off"));
        assert!(chardevs.contains(&"socket,id=agent,fd=4,server=on,wait=off"));
        assert_eq!(after(&args, "-mon"), ["chardev=qmp,mode=control"]);
    }

    #[test]
    fn block_paths_with_commas_are_escaped() {
        let b = BlockArgs {
            id: "blk0".into(),
            path: "/img/a,b.img".into(),
            read_only: true,
            place: None,
        };
        assert!(blockdev_arg(&b).contains("file.filename=/img/a,,b.img,"));
    }

    #[test]
    fn confinement_options_are_passed_as_given() {
        let mut s = spec();
        let args = s.args();
        for flag in ["-sandbox", "-add-fd", "-chroot", "-runas"] {
            assert!(after(&args, flag).is_empty(), "{flag} in {args:?}");
        }
        s.seccomp = Some("on,spawn=deny".into());
        s.fdsets = vec![(1, 5), (2, 6)];
        s.console_log = fdset_path(1);
        s.chroot = Some("/proc/self/fd/7".into());
        let args = s.args();
        assert_eq!(after(&args, "-sandbox"), ["on,spawn=deny"]);
        assert_eq!(after(&args, "-add-fd"), ["fd=5,set=1", "fd=6,set=2"]);
        assert_eq!(after(&args, "-serial"), ["file:/dev/fdset/1"]);
        assert_eq!(after(&args, "-chroot"), ["/proc/self/fd/7"]);
        // QEMU's -runas would clear the parent-death signal: ids are set before exec.
        assert!(after(&args, "-runas").is_empty());
    }

    #[test]
    fn pci_paths_follow_kata_form() {
        assert_eq!(PciPlace::Root(3).pci_path(), "03");
        let p = PciPlace::Port {
            port: "rp0".into(),
            port_slot: 0x1c,
        };
        assert_eq!(p.pci_path(), "1c/00");
        assert_eq!(p.props(), "bus=rp0,addr=0x0");
    }
}
