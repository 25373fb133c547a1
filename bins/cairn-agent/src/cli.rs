//! Command-line syntax.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Cairn: block-level VM backup. Back up disks to a vault, sending only changed blocks.
#[derive(Parser, Debug)]
#[command(name = "cairn-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// Print one JSON document on stdout instead of tables and progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    /// VM configuration file (TOML): the VM, its disks and views, what to freeze, scripts.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a vault.
    Init(InitArgs),
    /// Back up a VM's disks into a vault.
    Backup(BackupArgs),
    /// List recovery points.
    Points(PointsArgs),
    /// Restore disks of a recovery point.
    Restore(RestoreArgs),
    /// Serve a point's disk read-only over NBD straight from its vault (an instant restore):
    /// `qemu-img`, `nbdcopy` or a QEMU guest read it at once, blocks fetched as they are read.
    ServeNbd(ServeNbdArgs),
    /// Files of a point's disk, straight from the vault without restoring it: list
    /// partitions, list folders, extract files and folders (ext2/3/4 in GPT, MBR or bare).
    #[command(subcommand)]
    Files(FilesCommand),
    /// Re-read every chunk of the chosen points and check it; exit 3 when anything is damaged.
    Verify(VerifyArgs),
    /// Prove a point restores: restore each disk to a temporary copy, compare sampled blocks
    /// with their digests, check its ext2/3/4 file systems with e2fsck, and note the outcome
    /// on the point (retention keeps the newest point a drill passed on); exit 3 if it failed.
    Drill(DrillArgs),
    /// Try Cairn on generated sample disks: full backup, 1% change, incremental, restore, verify.
    Quickstart(QuickstartArgs),
    /// Generate or change seeded sample disks (for trials and benchmarks).
    #[command(subcommand)]
    Sample(SampleCommand),
    /// Measure this machine: hashing, compression, CRC and AEAD rates, vault put/get, disk
    /// reads, and the backup window they project.
    Bench(BenchArgs),
    /// Expire the points a retention policy no longer keeps (soft delete), and purge the
    /// soft-deleted points whose grace time has passed.
    Prune(PruneArgs),
    /// Soft-delete one point: it stays restorable by id, and `undelete` brings it back, until
    /// its grace time has passed and a prune purges it.
    Delete(DeleteArgs),
    /// Bring a soft-deleted point back.
    Undelete(UndeleteArgs),
    /// Free the space no point needs: delete dead packs, repack mostly-dead ones, reap
    /// backups that died long ago. Safe beside running backups (it waits for those that
    /// started before it).
    Gc(GcArgs),
    /// Copy points into a second vault (3-2-1 backups; from a plaintext vault into an
    /// encrypted one), uploading only the chunks it lacks.
    Copy(CopyArgs),
    /// Repair a damaged vault: `repair index` rebuilds lost pack indexes from the packs.
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Lock a point: nothing may delete it before the time given (a lock cannot be shortened).
    Lock(LockArgs),
    /// Manage the keys of an encrypted vault: list, add, remove.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check a VM configuration file (--config) without backing anything up.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Install the agent on this host for a coordinator: folders, configuration, enrollment
    /// token and systemd unit, each change listed (`uninstall` reverts exactly those).
    Install(InstallArgs),
    /// Revert exactly what `install` did on this host.
    Uninstall(UninstallArgs),
    /// Run as the coordinator's agent: enroll, pull jobs by long poll, back up, report; keep
    /// the schedule while the coordinator is away.
    Run(RunArgs),
    /// Points whose views this host keeps (their snapshot tier): list them, or restore a disk
    /// from its kept view at once, without reading the vault.
    #[command(subcommand)]
    Held(HeldCommand),
    /// The thaw watchdog the agent starts for itself while file systems are frozen.
    #[command(name = "watchdog-thaw", hide = true)]
    WatchdogThaw {
        /// Deadline in milliseconds, then the mount points.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The coordinator's URL.
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// This agent's name at the coordinator (default: the host name).
    #[arg(long)]
    pub host: Option<String>,
    /// A file holding the one-time enrollment token (`cairn-coordinator enroll HOST`).
    #[arg(long, value_name = "FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// Install under this folder instead of / (an image being built, a test).
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
    /// The agent's executable as the host runs it (default: this one).
    #[arg(long, value_name = "PATH")]
    pub executable: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    /// The folder `install` was given as --root.
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The agent's configuration.
    #[arg(long, default_value = "/etc/cairn/agent.toml", value_name = "FILE")]
    pub agent_config: PathBuf,
    /// Tests only: read the time from this file (RFC 3339) instead of the clock.
    #[arg(long, hide = true)]
    pub fake_clock: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum HeldCommand {
    /// Lists the held points, their disks and when their views are released.
    List {
        /// The agent's configuration (its state folder holds the list).
        #[arg(long, default_value = "/etc/cairn/agent.toml", value_name = "FILE")]
        agent_config: PathBuf,
    },
    /// Copies a disk as it was at a held point from its kept view (a reflink clone where the
    /// file system can, else a copy); the copy is the disk's image file as it was, in its
    /// own format (a running QEMU VM's qcow2 image stays qcow2).
    Restore {
        /// The agent's configuration.
        #[arg(long, default_value = "/etc/cairn/agent.toml", value_name = "FILE")]
        agent_config: PathBuf,
        /// The VM, by the coordinator's name.
        #[arg(long)]
        vm: String,
        /// The point (default: the VM's newest held point).
        #[arg(long)]
        point: Option<String>,
        /// The disk.
        #[arg(long)]
        disk: String,
        /// Where to write it (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A vault to measure puts and gets against (default: a temporary local folder).
    #[arg(long, value_name = "URL")]
    pub vault: Option<String>,
    /// A disk or image to measure sequential reads on.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Read at most this much of --disk.
    #[arg(long, default_value = "1G", value_parser = crate::units::parse_size)]
    pub read_limit: u64,
    /// Disk size for the projected backup window.
    #[arg(long, default_value = "100G", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// Fraction of the disk that is allocated (not holes).
    #[arg(long, default_value_t = 0.7)]
    pub allocated: f64,
    /// Fraction of the disk changed per day.
    #[arg(long, default_value_t = 0.05)]
    pub change: f64,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Parse the VM configuration, check scripts' modes and owners, mount points and disks.
    Check,
}

#[derive(Args, Debug)]
pub struct VaultArg {
    /// The vault: a path, file:///path, s3://bucket/prefix, az://container/prefix or
    /// gs://bucket/prefix (object stores read their usual AWS_*, AZURE_*, GOOGLE_* variables).
    #[arg(long, value_name = "URL")]
    pub vault: String,
    /// An option of the object store, KEY=VALUE (repeatable): object_store's config keys, such
    /// as aws_endpoint, aws_region, aws_allow_http, azure_storage_account_name. Wins over the
    /// environment.
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = cairn_vault::StoreOptions::parse_pair)]
    pub store_options: Vec<(String, String)>,
    /// The key file of an encrypted vault (`init` creates it when it does not exist).
    #[arg(long, value_name = "PATH", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// A file holding the passphrase of an encrypted vault (else CAIRN_PASSPHRASE, else a
    /// prompt on a terminal).
    #[arg(long, value_name = "PATH")]
    pub passphrase_file: Option<PathBuf>,
    /// Open the vault append-only: add chunks, points and notes; refuse every delete.
    #[arg(long)]
    pub append_only: bool,
}

impl VaultArg {
    /// The store options given.
    pub fn options(&self) -> cairn_vault::StoreOptions {
        cairn_vault::StoreOptions(self.store_options.clone())
    }
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// Block size of disk indexes (4K to 4M, a power of two).
    #[arg(long, default_value = "64K", value_parser = crate::units::parse_size)]
    pub block_size: u64,
    /// Store the vault's data unencrypted (new vaults are encrypted unless this is given).
    #[arg(long, conflicts_with_all = ["key_file", "passphrase_file"])]
    pub no_encryption: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List the key slots of an encrypted vault.
    List(KeyListArgs),
    /// Add a key slot: a new key file, a new passphrase, or a recovery key to print.
    Add(KeyAddArgs),
    /// Remove a key slot (never the last one).
    Remove(KeyRemoveArgs),
}

#[derive(Args, Debug)]
pub struct KeyListArgs {
    #[command(flatten)]
    pub vault: VaultArg,
}

#[derive(Args, Debug)]
pub struct KeyAddArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// The new key: a key file (created when it does not exist).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["new_passphrase_file", "recovery"])]
    pub new_key_file: Option<PathBuf>,
    /// The new key: a passphrase read from this file (or asked for on a terminal).
    #[arg(long, value_name = "PATH", conflicts_with = "recovery")]
    pub new_passphrase_file: Option<PathBuf>,
    /// The new key: a recovery key, printed once; write it down and keep it offline.
    #[arg(long)]
    pub recovery: bool,
    /// A note shown by `key list`.
    #[arg(long, default_value = "")]
    pub label: String,
}

#[derive(Args, Debug)]
pub struct KeyRemoveArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// The slot to remove (from `key list`).
    #[arg(long)]
    pub slot: String,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// The VM's name (without --config).
    #[arg(long)]
    pub vm: Option<String>,
    /// A disk: NAME=PATH, or PATH (named after its file name), then ",format=qcow2" for a
    /// qcow2 image (raw otherwise: a format is declared, never guessed from the disk's bytes)
    /// and ",backing=allow" to accept a qcow2 backing file. Repeat for each disk. Without
    /// --config the disks are read live, with no snapshot (consistency "none").
    #[arg(long = "disk", value_name = "[NAME=]PATH[,format=raw|qcow2][,backing=allow]")]
    pub disks: Vec<String>,
    /// Hashing threads per disk (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Disks read at once (default 2); each costs about 50 MiB of memory while it is read.
    #[arg(long, value_name = "N")]
    pub parallel_disks: Option<usize>,
    /// Keep this point until then whatever retention says (an on-demand backup): a time
    /// (2027-01-31, 2027-01-31T12:00:00Z) or a span from now (30d).
    #[arg(long, value_name = "TIME", value_parser = crate::units::parse_time)]
    pub retain_until: Option<jiff::Timestamp>,
}

#[derive(Args, Debug)]
pub struct PointsArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// Only this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// List the soft-deleted points (restorable by id until purged) instead.
    #[arg(long)]
    pub deleted: bool,
}

/// Retention rules; the names are those of policy files (`keep-daily = 7`).
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Keep the N newest points.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the N newest hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the N newest days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the N newest ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the N newest months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the N newest years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every point taken within this span of the newest one: 14d, 36h, 6mo, "1y 6mo".
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<cairn_policy::KeepWithin>,
    /// The IANA time zone of hours, days, weeks, months and years (default UTC).
    #[arg(long, value_name = "ZONE")]
    pub time_zone: Option<String>,
}

impl RetentionArgs {
    /// The policy these flags describe.
    pub fn retention(&self) -> cairn_policy::Retention {
        cairn_policy::Retention {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            time_zone: self.time_zone.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// Only this VM (default: every VM, each on its own).
    #[arg(long)]
    pub vm: Option<String>,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// How long an expired point stays soft-deleted (restorable, undeletable) before it is
    /// purged.
    #[arg(long, default_value = "14d", value_name = "DURATION", value_parser = crate::units::parse_duration)]
    pub grace: jiff::SignedDuration,
    /// Print what would be expired and purged, and which rule keeps each kept point.
    #[arg(long)]
    pub dry_run: bool,
}

/// A point to read: the vault, the VM, and the point (the newest by default).
#[derive(Args, Debug)]
pub struct PointChoice {
    #[command(flatten)]
    pub vault: VaultArg,
    /// The VM.
    #[arg(long)]
    pub vm: String,
    /// The point: an id, or `latest`.
    #[arg(long, default_value = "latest")]
    pub point: String,
}

/// One point of one VM.
#[derive(Args, Debug)]
pub struct PointArg {
    #[command(flatten)]
    pub vault: VaultArg,
    #[arg(long)]
    pub vm: String,
    /// The point's id (from `cairn-agent points`).
    #[arg(long)]
    pub point: String,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub target: PointArg,
    /// How long it stays soft-deleted before a prune purges it.
    #[arg(long, default_value = "14d", value_name = "DURATION", value_parser = crate::units::parse_duration)]
    pub grace: jiff::SignedDuration,
}

#[derive(Args, Debug)]
pub struct UndeleteArgs {
    #[command(flatten)]
    pub target: PointArg,
    /// Also keep it until then, whatever retention says (so that the next prune leaves it): a
    /// time (2027-01-31, 2027-01-31T12:00:00Z) or a span from now (30d).
    #[arg(long, value_name = "TIME", value_parser = crate::units::parse_time)]
    pub retain_until: Option<jiff::Timestamp>,
}

#[derive(Args, Debug)]
pub struct LockArgs {
    #[command(flatten)]
    pub target: PointArg,
    /// The end of the lock: a time (2027-01-31, 2027-01-31T12:00:00Z) or a span from now (90d).
    #[arg(long, value_name = "TIME", value_parser = crate::units::parse_time)]
    pub until: jiff::Timestamp,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub from: PointChoice,
    /// One disk; without it every disk is restored into the folder --to.
    #[arg(long)]
    pub disk: Option<String>,
    /// Target file or block device (with --disk), or folder (one file per disk).
    #[arg(long)]
    pub to: PathBuf,
    /// Overwrite an existing non-empty target (a device always needs it).
    #[arg(long)]
    pub force: bool,
    /// The format of a new target: raw, or qcow2 (a sparse version 3 image).
    #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
    pub format: FormatArg,
    /// Write over the disk the point came from, only the blocks that differ (it reads and
    /// hashes the whole target). Not atomic: a restore that stops halfway leaves it part old,
    /// part new. Needs --force; refused while anything has the target open for writing.
    #[arg(long, requires = "force")]
    pub in_place: bool,
    /// Where the vault's data for a block is damaged or missing, leave zeros, name the block
    /// and go on with the rest (the command then exits 3), instead of stopping.
    #[arg(long)]
    pub keep_going: bool,
}

/// Image formats a restore writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    /// The disk's bytes as they are.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("on").required(true).args(["socket", "listen"])))]
pub struct ServeNbdArgs {
    #[command(flatten)]
    pub disk: PointDiskArgs,
    /// Serve on this unix socket (made 0600; it must not exist).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve on this TCP address: a loopback address, or any with --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// With --listen: clients must upgrade to TLS (NBD's STARTTLS) and are shown this PEM
    /// certificate chain.
    #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How far ahead of a reader going in order blocks are fetched.
    #[arg(long, default_value_t = 16)]
    pub read_ahead_mib: u64,
    /// Note on the point, when the server stops, the blocks clients read first and in which
    /// order (a guest booting from the export): later exports of the VM fetch them at once.
    #[arg(long)]
    pub record_reads: bool,
    /// Do not fetch the blocks a guest read first at an earlier boot before they are asked.
    #[arg(long)]
    pub no_prefetch: bool,
}

/// A point's disk read in place from its vault (`serve-nbd`, `files`).
#[derive(Args, Debug)]
pub struct PointDiskArgs {
    #[command(flatten)]
    pub from: PointChoice,
    /// The disk (an export is named after it).
    #[arg(long)]
    pub disk: String,
    /// Memory for blocks fetched from the vault.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: u64,
}

#[derive(Subcommand, Debug)]
pub enum FilesCommand {
    /// The disk's partitions and the file system of each.
    Partitions(FilesDiskArgs),
    /// List a folder (or one file) of the point's disk, like `ls -l`.
    Ls(FilesLsArgs),
    /// Extract files, symlinks and folders under a host folder, with their mode, owner (as
    /// root) and times; holes stay holes. Never overwrites; device nodes are skipped.
    Get(FilesGetArgs),
}

#[derive(Args, Debug)]
pub struct FilesDiskArgs {
    #[command(flatten)]
    pub disk: PointDiskArgs,
    /// How far ahead of a file read in order blocks are fetched (0: only what is read, the
    /// fewest fetches; more: faster large files from object storage).
    #[arg(long, default_value_t = 4)]
    pub read_ahead_mib: u64,
}

#[derive(Args, Debug)]
pub struct FilesLsArgs {
    #[command(flatten)]
    pub disk: FilesDiskArgs,
    /// The partition, numbered as Linux does (sda1 is 1); without it, the disk's only ext4
    /// partition (`files partitions` lists them).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Everything under the folder, not only what it holds.
    #[arg(short, long)]
    pub recursive: bool,
    /// Entries listed at most.
    #[arg(long, default_value_t = 50_000_000)]
    pub max_entries: u64,
    /// The folder or file, an absolute path in the point's file system.
    #[arg(default_value = "/")]
    pub path: String,
}

#[derive(Args, Debug)]
pub struct FilesGetArgs {
    #[command(flatten)]
    pub disk: FilesDiskArgs,
    /// The partition, numbered as Linux does (sda1 is 1); without it, the disk's only ext4
    /// partition.
    #[arg(long)]
    pub partition: Option<u32>,
    /// The host folder to extract into (made, private, if missing): /etc/hosts becomes
    /// DIR/hosts, /etc becomes DIR/etc, / fills DIR.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Keep set-user-ID and set-group-ID bits (dropped by default, so that restoring a
    /// guest's files cannot plant a set-user-ID program on the host).
    #[arg(long)]
    pub keep_setid: bool,
    /// Entries extracted at most (a crafted file system can reach a folder many times).
    #[arg(long, default_value_t = 50_000_000)]
    pub max_entries: u64,
    /// The files or folders, absolute paths in the point's file system.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// Only this VM's points.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only this point.
    #[arg(long)]
    pub point: Option<String>,
}

#[derive(Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    pub from: PointChoice,
    /// A folder with room for the largest disk's data (the copy is sparse and removed after
    /// each disk).
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// Blocks per disk whose restored bytes are compared with their digests.
    #[arg(long, default_value_t = 1024)]
    pub sample_blocks: u64,
    /// The e2fsck to run (default: the system's, from /usr/sbin or /sbin).
    #[arg(long)]
    pub e2fsck: Option<PathBuf>,
    /// Do not note the outcome on the point (a trial run).
    #[arg(long)]
    pub no_record: bool,
    /// Read every folder, link and file of each volume straight from the vault instead of
    /// restoring a copy: needs no room in --work-dir and runs no e2fsck (it proves less).
    #[arg(long)]
    pub read_files: bool,
}

#[derive(Args, Debug)]
pub struct QuickstartArgs {
    /// Size of the first sample disk; the second is half of it.
    #[arg(long, default_value = "512M", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// Work in this folder and keep it (default: a temporary folder, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Fraction of 4 KiB blocks changed between the two backups.
    #[arg(long, default_value_t = 0.01)]
    pub change: f64,
    /// Seed of the sample data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Subcommand, Debug)]
pub enum SampleCommand {
    /// Write a seeded sample disk (holes, zeros, random and log-like data).
    Create {
        /// The image file to write (replaced if it exists).
        path: PathBuf,
        /// Its size, e.g. 4G.
        #[arg(long, value_parser = crate::units::parse_size)]
        size: u64,
        /// The seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Overwrite random 4 KiB blocks, or one contiguous range, with random data.
    Mutate {
        /// The image file to change.
        path: PathBuf,
        /// Fraction of 4 KiB blocks to overwrite at random offsets.
        #[arg(long, conflicts_with = "range")]
        fraction: Option<f64>,
        /// A contiguous range OFFSET:LENGTH (e.g. 1G:64M) to overwrite.
        #[arg(long)]
        range: Option<String>,
        /// The seed.
        #[arg(long, default_value_t = 2)]
        seed: u64,
    },
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// Report what would be freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// A backup whose in-flight marker is older than this is taken for dead: its leftovers
    /// are removed and it may not commit. Must exceed the longest backup.
    #[arg(long, default_value = "48h", value_name = "DURATION", value_parser = crate::units::parse_duration)]
    pub stale_after: jiff::SignedDuration,
    /// Repack a pack when less than this percentage of its bytes is still needed.
    #[arg(long, default_value_t = 50.0, value_name = "PERCENT")]
    pub repack_below: f64,
    /// Do not wait for backups that started before this run: leave its plan for a later run.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild the pack index of every pack no readable pack index names, from the pack's own
    /// table, each frame checked (a bad one is left out).
    Index(RepairIndexArgs),
}

#[derive(Args, Debug)]
pub struct RepairIndexArgs {
    #[command(flatten)]
    pub vault: VaultArg,
    /// Read and check, write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The vault to copy from.
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// Its key file, if it is encrypted.
    #[arg(long, value_name = "PATH", conflicts_with = "from_passphrase_file")]
    pub from_key_file: Option<PathBuf>,
    /// Its passphrase file, if it is encrypted.
    #[arg(long, value_name = "PATH")]
    pub from_passphrase_file: Option<PathBuf>,
    /// The vault to copy into (created beforehand with `init`).
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// Its key file, if it is encrypted.
    #[arg(long, value_name = "PATH", conflicts_with = "to_passphrase_file")]
    pub to_key_file: Option<PathBuf>,
    /// Its passphrase file, if it is encrypted.
    #[arg(long, value_name = "PATH")]
    pub to_passphrase_file: Option<PathBuf>,
    /// Only this VM's points.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only this point (needs --vm; copied even if soft-deleted).
    #[arg(long, requires = "vm")]
    pub point: Option<String>,
}
