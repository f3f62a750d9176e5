/* A stand-in for VMware's libvixDiskLib.so.N, for tests only.
 *
 * Real VDDK cannot be downloaded, so the tests build this with gcc and
 * point vddktool at it.  The structures are declared from
 * ../shared/docs/vddk-abi.md (x86-64), independently of the Python
 * binding, so that a wrong ctypes layout shows up as wrong values here
 * instead of "working" against an equally wrong fake.
 *
 * Disks are plain raw files: a local path is used as is, a remote path
 * "[ds] dir/file.vmdk" is looked up under $FAKE_VDDK_REMOTE_ROOT/ds/dir/.
 * Environment variables (read at each call, so a test sets them per
 * server) make ConnectEx check what the binding passed, record every call
 * of interest in a text file, and inject faults.  The Python helper
 * tests/fake_vddk/fixtures.py documents them for test writers.
 *
 * Compile-time switches (build.py sets them):
 *   FAKE_VDDK_MAJOR     the library's major version (6..9)
 *   FAKE_VDDK_OPTIONAL  export the 6.7+ optional functions
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef FAKE_VDDK_MAJOR
#define FAKE_VDDK_MAJOR 8
#endif

#define EXPORT __attribute__((visibility("default")))

/* ---- Types, constants and structures, as the ABI document gives them. */

typedef uint64_t VixError;

#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_OUT_OF_MEMORY 2
#define VIX_E_INVALID_ARG 3
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_FILE_ERROR 7
#define VIX_E_FILE_READ_ONLY 11
#define VIX_E_FILE_ALREADY_EXISTS 12
#define VIX_E_FILE_ACCESS_ERROR 13
#define VIX_E_HOST_USER_PERMISSIONS 3014
#define VIX_ASYNC 25000

#define SECTOR_SIZE 512

#define OPEN_READ_ONLY 4

#define CRED_UID 1
#define CRED_SESSIONID 2

#define MIN_CHUNK_SIZE 128
#define MAX_CHUNK_NUMBER (512 * 1024)

typedef void LogFunc (const char *fmt, va_list args);
typedef void CompletionFunc (void *data, VixError result);

typedef struct {
  uint32_t cylinders;
  uint32_t heads;
  uint32_t sectors;
} Geometry;

typedef struct {
  char *vmxSpec;
  char *serverName;
  char *thumbPrint;
  long reserved1;
  int credType;
  union {
    struct {
      char *userName;
      char *password;
    } uid;
    struct {
      char *cookie;
      char *userName;
      char *key;
    } sessionId;
    void *ticketId;
  } creds;
  uint32_t port;
  uint32_t nfcHostPort;
  char *reserved3;
  char reserved4[8];
  void *reserved5;
  union {
    struct {
      char *id;
      char *datastoreMoRef;
      char *ssId;
    } vStorageObjSpec;
  } spec;
  int specType;
} ConnectParams;

typedef struct {
  Geometry biosGeo;
  Geometry physGeo;
  uint64_t capacity;
  int adapterType;
  int numLinks;
  char *parentFileNameHint;
  char *uuid;
  uint32_t logicalSectorSize;
  uint32_t physicalSectorSize;
} Info;

typedef struct {
  uint64_t offset;
  uint64_t length;
} Block;

typedef struct {
  uint32_t numBlocks;
  Block blocks[1];
} BlockList;

typedef struct {
  int diskType;
  int adapterType;
  uint16_t hwVersion;
  uint64_t capacity;
  uint32_t logicalSectorSize;
  uint32_t physicalSectorSize;
} CreateParams;

/* ---- The fake's own state. */

struct connection {
  int remote;
  int read_only;
  char *transport;              /* what GetTransportMode reports */
};

struct handle {
  int fd;
  uint64_t capacity;            /* sectors */
  char *path;                   /* the file behind the disk */
  const char *transport;
  int remote;
  pthread_mutex_t lock;
  pthread_cond_t idle;
  unsigned pending;             /* async requests not yet completed */
  int busy;                     /* callers inside a call on this handle */
};

struct async_request {
  struct handle *h;
  int is_write;
  uint64_t sector, count;
  unsigned char *buf;
  CompletionFunc *done;
  void *data;
  struct timespec due;           /* when the pool may run it */
  struct async_request *next;    /* the pool's queue, by due time */
};

static LogFunc *log_fn, *warn_fn, *panic_fn;
static int initialized;
static pid_t init_pid;

/* Things handed to the caller that it must give back through a Free*
 * call; tests read the count with fake_vddk_outstanding() to find leaks. */
static int outstanding;
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;

static void
count_outstanding (int delta)
{
  pthread_mutex_lock (&state_lock);
  outstanding += delta;
  pthread_mutex_unlock (&state_lock);
}

/* Pass a real varargs list, as VDDK does, so the binding's vsnprintf
 * path is what formats it. */
static void call_logger (LogFunc *fn, const char *fmt, ...)
  __attribute__((format (printf, 2, 3)));

static void
call_logger (LogFunc *fn, const char *fmt, ...)
{
  va_list args;

  if (fn == NULL)
    return;
  va_start (args, fmt);
  fn (fmt, args);
  va_end (args);
}

#define LOG(fmt, ...) call_logger (log_fn, fmt, ##__VA_ARGS__)
#define WARN(fmt, ...) call_logger (warn_fn, fmt, ##__VA_ARGS__)

static const char *
or_null (const char *s)
{
  return s ? s : "(null)";
}

/* One line per call of interest, appended to $FAKE_VDDK_RECORD.  A
 * single write(2) on an O_APPEND file keeps lines from async worker
 * threads whole. */
static void record (const char *fmt, ...)
  __attribute__((format (printf, 1, 2)));

static void
record (const char *fmt, ...)
{
  const char *path = getenv ("FAKE_VDDK_RECORD");
  char *line = NULL;
  va_list args;
  int len, fd;

  if (path == NULL || *path == '\0')
    return;
  va_start (args, fmt);
  len = vasprintf (&line, fmt, args);
  va_end (args);
  if (len < 0)
    return;
  fd = open (path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd >= 0) {
    line[len] = '\n';           /* vasprintf left room for the NUL */
    if (write (fd, line, len + 1) != len + 1)
      perror ("fake_vddk: record");
    close (fd);
  }
  free (line);
}

static char *
hex_of (const void *p, size_t n)
{
  static const char digits[] = "0123456789abcdef";
  const unsigned char *bytes = p;
  char *out = malloc (2 * n + 1);
  size_t i;

  if (out == NULL)
    abort ();
  for (i = 0; i < n; i++) {
    out[2*i] = digits[bytes[i] >> 4];
    out[2*i+1] = digits[bytes[i] & 15];
  }
  out[2*n] = '\0';
  return out;
}

static const char *
env_value (const char *name)
{
  const char *v = getenv (name);
  return v && *v ? v : NULL;
}

/* Byte offset where the environment asks a request to fail, or -1. */
static long long
fault_offset (const char *name)
{
  const char *v = env_value (name);
  return v ? strtoll (v, NULL, 0) : -1;
}

static int
covers_fault (const char *name, uint64_t sector, uint64_t count)
{
  long long at = fault_offset (name);

  return at >= 0 &&
    (uint64_t) at >= sector * SECTOR_SIZE &&
    (uint64_t) at < (sector + count) * SECTOR_SIZE;
}

/* $FAKE_VDDK_FAIL_READ_TIMES=N (or _WRITE_TIMES): the fault at
 * FAKE_VDDK_FAIL_READ_AT (or _WRITE_AT) hits only the first N requests
 * covering it, then clears, as a network hiccup would.  The count is
 * process-wide, so closing and reopening the disk does not reset it.
 * Unset, the fault hits every time. */
static int faults_hit[2];

static int
fault_hits (int is_write)
{
  const char *times = env_value (is_write ? "FAKE_VDDK_FAIL_WRITE_TIMES"
                                          : "FAKE_VDDK_FAIL_READ_TIMES");

  if (times == NULL)
    return 1;
  return __atomic_add_fetch (&faults_hit[is_write], 1, __ATOMIC_SEQ_CST)
    <= strtol (times, NULL, 10);
}

/* Real VDDK's Open and Close must not run in several threads at once
 * (callers serialize them process-wide).  Each takes a little while here
 * (2 ms, or $FAKE_VDDK_OPEN_CLOSE_PAUSE_MS) so that an overlap is caught:
 * it is recorded as "Overlap call=NAME" and reported through the warning
 * callback. */
static int open_close_busy;

static int
enter_open_close (const char *name)
{
  const char *pause_ms = env_value ("FAKE_VDDK_OPEN_CLOSE_PAUSE_MS");
  long ms = pause_ms ? strtol (pause_ms, NULL, 10) : 2;
  struct timespec pause = { ms / 1000, ms % 1000 * 1000 * 1000 };
  int overlapped = __atomic_add_fetch (&open_close_busy, 1,
                                       __ATOMIC_SEQ_CST) > 1;

  if (overlapped) {
    record ("Overlap call=%s", name);
    WARN ("VixDiskLib: %s called while another Open or Close runs\n", name);
  }
  nanosleep (&pause, NULL);
  return overlapped;
}

static void
leave_open_close (void)
{
  __atomic_sub_fetch (&open_close_busy, 1, __ATOMIC_SEQ_CST);
}

/* A VixDiskLib handle is not safe for concurrent calls: callers must let
 * one thread at a time into it.  Every call on a handle passes through
 * these two; an overlap is recorded as "HandleOverlap call=NAME" and
 * reported through the warning callback.  $FAKE_VDDK_HANDLE_PAUSE_US
 * holds each call that long, so that an overlap is likely to be seen. */
static void
enter_handle (struct handle *h, const char *name)
{
  const char *pause_us = env_value ("FAKE_VDDK_HANDLE_PAUSE_US");

  if (__atomic_add_fetch (&h->busy, 1, __ATOMIC_SEQ_CST) > 1) {
    record ("HandleOverlap call=%s", name);
    WARN ("VixDiskLib: %s called while another call uses the handle\n",
          name);
  }
  if (pause_us) {
    long us = strtol (pause_us, NULL, 10);
    struct timespec pause = { us / 1000000, us % 1000000 * 1000 };
    nanosleep (&pause, NULL);
  }
}

static void
leave_handle (struct handle *h)
{
  __atomic_sub_fetch (&h->busy, 1, __ATOMIC_SEQ_CST);
}

/* ---- Functions every supported VDDK has. */

EXPORT VixError
VixDiskLib_InitEx (uint32_t major, uint32_t minor,
                   LogFunc *log, LogFunc *warn, LogFunc *panic,
                   const char *libDir, const char *configFile)
{
  log_fn = log;
  warn_fn = warn;
  panic_fn = panic;
  initialized = 1;
  init_pid = getpid ();
  record ("InitEx major=%u minor=%u libdir=%s config=%s",
          major, minor, or_null (libDir), or_null (configFile));
  LOG ("VixDiskLib: fake VDDK %d.0 initialized for API %u.%u\n",
       FAKE_VDDK_MAJOR, major, minor);
  return VIX_OK;
}

static void stop_pool (void);

EXPORT void
VixDiskLib_Exit (void)
{
  record ("Exit");
  stop_pool ();
  initialized = 0;
  log_fn = warn_fn = panic_fn = NULL;
}

static const char *
error_message (VixError err)
{
  switch (err) {
  case VIX_OK: return "The operation was successful";
  case VIX_E_FAIL: return "Unknown error";
  case VIX_E_OUT_OF_MEMORY: return "Memory allocation failed: out of memory";
  case VIX_E_INVALID_ARG: return "One of the parameters was invalid";
  case VIX_E_FILE_NOT_FOUND: return "The file was not found";
  case VIX_E_NOT_SUPPORTED: return "The operation is not supported";
  case VIX_E_FILE_ERROR: return "A file access error occurred";
  case VIX_E_FILE_READ_ONLY: return "The file is write-protected";
  case VIX_E_FILE_ALREADY_EXISTS: return "The file already exists";
  case VIX_E_FILE_ACCESS_ERROR:
    return "Insufficient permissions to access the file";
  case VIX_E_HOST_USER_PERMISSIONS:
    return "Cannot connect to host: incorrect user name or password";
  default: return "Unknown error code";
  }
}

EXPORT char *
VixDiskLib_GetErrorText (VixError err, const char *locale)
{
  char *text;

  (void) locale;
  if (asprintf (&text, "%s (fake VDDK error %llu)",
                error_message (err), (unsigned long long) err) < 0)
    return NULL;
  count_outstanding (1);
  return text;
}

EXPORT void
VixDiskLib_FreeErrorText (char *text)
{
  if (text == NULL)
    return;
  count_outstanding (-1);
  free (text);
}

/* The credential fields as the record shows them. */
static void
credentials (const ConnectParams *p, const char **user,
             const char **password, const char **cookie)
{
  *user = *password = *cookie = NULL;
  if (p->credType == CRED_SESSIONID) {
    *user = p->creds.sessionId.userName;
    *cookie = p->creds.sessionId.cookie;
  }
  else {
    *user = p->creds.uid.userName;
    *password = p->creds.uid.password;
  }
}

static int
same_string (const char *expected, const char *got)
{
  return got != NULL && strcmp (expected, got) == 0;
}

static int
same_number (const char *expected, uint32_t got)
{
  return strtoul (expected, NULL, 0) == got;
}

/* Mimic the checks a real server makes, against what the test expects. */
static VixError
check_connect (const ConnectParams *p, const char *snapshotRef,
               const char *transportModes)
{
  const char *user, *password, *cookie, *want;

  credentials (p, &user, &password, &cookie);

  if ((want = env_value ("FAKE_VDDK_EXPECT_SERVER")) &&
      !same_string (want, p->serverName)) {
    LOG ("VixDiskLibVim: Cannot resolve host %s\n", or_null (p->serverName));
    return VIX_E_FAIL;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_PORT")) &&
      !same_number (want, p->port)) {
    LOG ("VixDiskLibVim: Connection refused on port %u\n", p->port);
    return VIX_E_FAIL;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_THUMBPRINT")) &&
      !same_string (want, p->thumbPrint)) {
    LOG ("VixDiskLibVim: Failed to verify SSL certificate: "
         "actual thumbprint=%s expected=%s\n",
         want, or_null (p->thumbPrint));
    return VIX_E_FAIL;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_COOKIE")) &&
      (p->credType != CRED_SESSIONID || !same_string (want, cookie))) {
    LOG ("VixDiskLibVim: Login with session cookie failed (credType %d)\n",
         p->credType);
    return VIX_E_HOST_USER_PERMISSIONS;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_USER")) &&
      !same_string (want, user)) {
    LOG ("VixDiskLibVim: Login failed for user %s\n", or_null (user));
    return VIX_E_HOST_USER_PERMISSIONS;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_PASSWORD")) &&
      !same_string (want, password)) {
    LOG ("VixDiskLibVim: Login failed: wrong password for user %s\n",
         or_null (user));
    return VIX_E_HOST_USER_PERMISSIONS;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_VM")) &&
      !same_string (want, p->vmxSpec)) {
    LOG ("VixDiskLibVim: Cannot find virtual machine %s\n",
         or_null (p->vmxSpec));
    return VIX_E_FILE_NOT_FOUND;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_SNAPSHOT")) &&
      !same_string (want, snapshotRef)) {
    LOG ("VixDiskLibVim: Cannot find snapshot %s\n", or_null (snapshotRef));
    return VIX_E_FILE_NOT_FOUND;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_TRANSPORTS")) &&
      !same_string (want, transportModes)) {
    LOG ("VixDiskLib: No transport mode among %s\n",
         or_null (transportModes));
    return VIX_E_NOT_SUPPORTED;
  }
  if ((want = env_value ("FAKE_VDDK_EXPECT_NFCHOSTPORT")) &&
      !same_number (want, p->nfcHostPort)) {
    LOG ("VixDiskLib: NFC connection refused on port %u\n", p->nfcHostPort);
    return VIX_E_FAIL;
  }
  return VIX_OK;
}

/* The first mode of "a:b:c", or NULL for none. */
static char *
first_transport (const char *modes)
{
  size_t n;

  if (modes == NULL || *modes == '\0')
    return NULL;
  n = strcspn (modes, ":");
  return strndup (modes, n);
}

EXPORT VixError
VixDiskLib_ConnectEx (const ConnectParams *params, char readOnly,
                      const char *snapshotRef, const char *transportModes,
                      struct connection **out)
{
  const char *user, *password, *cookie;
  struct connection *conn;
  char *params_hex;
  VixError err;

  if (params == NULL || out == NULL)
    return VIX_E_INVALID_ARG;

  credentials (params, &user, &password, &cookie);
  params_hex = hex_of (params, sizeof *params);
  record ("ConnectEx readOnly=%d snapshot=%s transports=%s params=%s "
          "vmxSpec=%s serverName=%s thumbPrint=%s userName=%s password=%s "
          "cookie=%s port=%u nfcHostPort=%u credType=%d",
          readOnly, or_null (snapshotRef), or_null (transportModes),
          params_hex, or_null (params->vmxSpec),
          or_null (params->serverName), or_null (params->thumbPrint),
          or_null (user), or_null (password), or_null (cookie),
          params->port, params->nfcHostPort, params->credType);
  free (params_hex);

  /* Real VDDK's background threads do not survive fork(2); make the
   * mistake of initializing before daemonizing visible. */
  if (!initialized || init_pid != getpid ()) {
    WARN ("VixDiskLib: ConnectEx called %s\n",
          initialized ? "in a process forked after InitEx"
                      : "before InitEx");
    return VIX_E_FAIL;
  }

  if (params->serverName != NULL) {
    err = check_connect (params, snapshotRef, transportModes);
    if (err != VIX_OK)
      return err;
  }

  conn = calloc (1, sizeof *conn);
  if (conn == NULL)
    return VIX_E_FAIL;
  conn->remote = params->serverName != NULL;
  conn->read_only = readOnly != 0;
  if (conn->remote) {
    conn->transport = first_transport (transportModes);
    if (conn->transport == NULL)
      conn->transport = strdup ("nbdssl");
  }
  else
    conn->transport = strdup ("file");
  LOG ("VixDiskLib: connected to %s\n",
       conn->remote ? params->serverName : "local files");
  *out = conn;
  return VIX_OK;
}

EXPORT VixError
VixDiskLib_Disconnect (struct connection *conn)
{
  record ("Disconnect");
  if (conn == NULL)
    return VIX_E_INVALID_ARG;
  free (conn->transport);
  free (conn);
  return VIX_OK;
}

/* The file behind a VDDK path: "[ds] dir/f.vmdk" -> ROOT/ds/dir/f.vmdk. */
static char *
backing_file (const struct connection *conn, const char *path)
{
  const char *root, *close_bracket, *rest;
  char *file;

  if (!conn->remote)
    return strdup (path);
  root = env_value ("FAKE_VDDK_REMOTE_ROOT");
  close_bracket = strchr (path, ']');
  if (root == NULL || path[0] != '[' || close_bracket == NULL)
    return NULL;
  rest = close_bracket + 1;
  while (*rest == ' ')
    rest++;
  if (asprintf (&file, "%s/%.*s/%s", root,
                (int) (close_bracket - path - 1), path + 1, rest) < 0)
    return NULL;
  return file;
}

/* VDDK puts a lock directory next to a local disk opened for writing.
 * Tests run as root, for whom access(2) always grants, so a directory
 * without any write permission bits counts as read-only too. */
static int
lock_directory_writable (const char *file)
{
  char *directory = strdup (file);
  char *slash = strrchr (directory, '/');
  struct stat st;
  int writable;

  if (slash == directory)
    slash[1] = '\0';
  else if (slash != NULL)
    *slash = '\0';
  else
    strcpy (directory, ".");
  writable = access (directory, W_OK) == 0 &&
    stat (directory, &st) == 0 && (st.st_mode & 0222) != 0;
  free (directory);
  return writable;
}

static VixError open_disk (struct connection *conn, const char *path,
                           uint32_t flags, struct handle **out);

EXPORT VixError
VixDiskLib_Open (struct connection *conn, const char *path, uint32_t flags,
                 struct handle **out)
{
  VixError err;

  record ("Open path=%s flags=%u", or_null (path), flags);
  LOG ("VixDiskLib: Open %s flags %u\n", or_null (path), flags);
  if (enter_open_close ("Open"))
    err = VIX_E_FAIL;
  else
    err = open_disk (conn, path, flags, out);
  leave_open_close ();
  return err;
}

static VixError
open_disk (struct connection *conn, const char *path, uint32_t flags,
           struct handle **out)
{
  struct handle *h;
  struct stat st;
  char *file;
  int fd, read_only;

  if (conn == NULL || path == NULL || out == NULL)
    return VIX_E_INVALID_ARG;
  if (env_value ("FAKE_VDDK_FAIL_OPEN")) {
    LOG ("VixDiskLib: VixDiskLib_OpenEx: Cannot open disk %s. "
         "Error 1 (Unknown error) at %d.\n", path, __LINE__);
    return VIX_E_FAIL;
  }

  file = backing_file (conn, path);
  if (file == NULL) {
    LOG ("VixDiskLib: %s is not \"[datastore] path\" or "
         "FAKE_VDDK_REMOTE_ROOT is unset\n", path);
    return VIX_E_FILE_NOT_FOUND;
  }
  read_only = conn->read_only || (flags & OPEN_READ_ONLY);
  if (!conn->remote && !read_only && !lock_directory_writable (file)) {
    WARN ("FILE: FileLockCreateEntryDirectory creation failure on "
          "'%s.lck': Permission denied\n", file);
    free (file);
    return VIX_E_FILE_ACCESS_ERROR;
  }
  fd = open (file, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd == -1 || fstat (fd, &st) == -1) {
    int failure = errno;

    LOG ("VixDiskLib: cannot open %s: %s\n", file, strerror (failure));
    if (fd >= 0)
      close (fd);
    free (file);
    return failure == ENOENT ? VIX_E_FILE_NOT_FOUND : VIX_E_FILE_ERROR;
  }

  h = calloc (1, sizeof *h);
  if (h == NULL)
    abort ();
  h->fd = fd;
  h->capacity = st.st_size / SECTOR_SIZE;
  h->path = file;
  h->transport = conn->transport;
  h->remote = conn->remote;
  pthread_mutex_init (&h->lock, NULL);
  pthread_cond_init (&h->idle, NULL);
  *out = h;
  return VIX_OK;
}

static void
wait_idle (struct handle *h)
{
  pthread_mutex_lock (&h->lock);
  while (h->pending > 0)
    pthread_cond_wait (&h->idle, &h->lock);
  pthread_mutex_unlock (&h->lock);
}

EXPORT VixError
VixDiskLib_Close (struct handle *h)
{
  record ("Close");
  if (h == NULL)
    return VIX_E_INVALID_ARG;
  /* Closing anyway after an overlap: a leak would hide the real fault. */
  enter_open_close ("Close");
  enter_handle (h, "Close");
  /* Never free a handle a worker thread still uses. */
  wait_idle (h);
  leave_handle (h);
  close (h->fd);
  free (h->path);
  pthread_mutex_destroy (&h->lock);
  pthread_cond_destroy (&h->idle);
  free (h);
  leave_open_close ();
  return VIX_OK;
}

EXPORT const char *
VixDiskLib_GetTransportMode (struct handle *h)
{
  const char *mode;

  if (h == NULL)
    return NULL;
  enter_handle (h, "GetTransportMode");
  mode = h->transport;
  leave_handle (h);
  return mode;
}

/* A stable, VMware-looking uuid derived from the backing file's name. */
static char *
make_uuid (const char *name)
{
  uint64_t hash = 1469598103934665603ULL;
  unsigned char b[16];
  char *uuid;
  int i;

  for (; *name; name++)
    hash = (hash ^ (unsigned char) *name) * 1099511628211ULL;
  for (i = 0; i < 16; i++) {
    hash = hash * 6364136223846793005ULL + 1442695040888963407ULL;
    b[i] = hash >> 56;
  }
  if (asprintf (&uuid, "60 00 C2 %02x %02x %02x %02x %02x %02x %02x "
                "%02x-%02x %02x %02x %02x %02x %02x %02x",
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                b[8], b[9], b[10], b[11], b[12], b[13], b[14]) < 0)
    return NULL;
  return uuid;
}

EXPORT VixError
VixDiskLib_GetInfo (struct handle *h, Info **out)
{
  Info *info;

  record ("GetInfo");
  if (h == NULL || out == NULL)
    return VIX_E_INVALID_ARG;
  info = calloc (1, sizeof *info);
  if (info == NULL)
    return VIX_E_FAIL;
  enter_handle (h, "GetInfo");
  info->capacity = h->capacity;
  info->biosGeo.heads = info->physGeo.heads = 16;
  info->biosGeo.sectors = info->physGeo.sectors = 63;
  info->biosGeo.cylinders = info->physGeo.cylinders =
    h->capacity / (16 * 63) > 16383 ? 16383 : h->capacity / (16 * 63);
  info->adapterType = 3;         /* LSI Logic, the usual for ESXi VMs */
  info->numLinks = 1;
  info->parentFileNameHint = NULL;
  info->uuid = make_uuid (h->path);
#if FAKE_VDDK_MAJOR >= 7
  info->logicalSectorSize = SECTOR_SIZE;
  info->physicalSectorSize = SECTOR_SIZE;
#endif
  count_outstanding (1);
  *out = info;
  leave_handle (h);
  return VIX_OK;
}

EXPORT void
VixDiskLib_FreeInfo (Info *info)
{
  if (info == NULL)
    return;
  count_outstanding (-1);
  free (info->uuid);
  free (info);
}

/* Large requests over the network transports can exhaust the ESXi NFC
 * service's memory; FAKE_VDDK_MAX_REQUEST_BYTES=N makes remote requests
 * above N bytes fail the way that looks. */
static int
exceeds_server_memory (const struct handle *h, uint64_t bytes)
{
  long long limit = fault_offset ("FAKE_VDDK_MAX_REQUEST_BYTES");

  if (limit < 0 || bytes <= (uint64_t) limit || !h->remote)
    return 0;
  WARN ("[NFC ERROR] NfcFssrvrProcessErrorMsg: received NFC error 5 from "
        "server: Failed to allocate the requested %llu bytes\n",
        (unsigned long long) bytes + 24);
  return 1;
}

/* The I/O both the sync and async calls do. */
static VixError
transfer (struct handle *h, int is_write, uint64_t sector, uint64_t count,
          unsigned char *buf)
{
  off_t offset = sector * SECTOR_SIZE;
  size_t remaining = count * SECTOR_SIZE;
  ssize_t r;

  if (sector > h->capacity || count > h->capacity - sector)
    return VIX_E_INVALID_ARG;
  if (covers_fault (is_write ? "FAKE_VDDK_FAIL_WRITE_AT"
                             : "FAKE_VDDK_FAIL_READ_AT", sector, count) &&
      fault_hits (is_write))
    return VIX_E_FILE_ERROR;
  if (exceeds_server_memory (h, remaining))
    return VIX_E_OUT_OF_MEMORY;
  while (remaining > 0) {
    r = is_write ? pwrite (h->fd, buf, remaining, offset)
                 : pread (h->fd, buf, remaining, offset);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 && errno == EBADF && is_write)
      return VIX_E_FILE_READ_ONLY;
    if (r <= 0)
      return VIX_E_FILE_ERROR;
    buf += r;
    offset += r;
    remaining -= r;
  }
  return VIX_OK;
}

EXPORT VixError
VixDiskLib_Read (struct handle *h, uint64_t startSector, uint64_t numSectors,
                 uint8_t *buf)
{
  VixError err;

  record ("Read sector=%llu count=%llu",
          (unsigned long long) startSector, (unsigned long long) numSectors);
  if (h == NULL || buf == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "Read");
  err = transfer (h, 0, startSector, numSectors, buf);
  leave_handle (h);
  return err;
}

EXPORT VixError
VixDiskLib_Write (struct handle *h, uint64_t startSector, uint64_t numSectors,
                  const uint8_t *buf)
{
  VixError err;

  record ("Write sector=%llu count=%llu",
          (unsigned long long) startSector, (unsigned long long) numSectors);
  if (h == NULL || buf == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "Write");
  err = transfer (h, 1, startSector, numSectors, (unsigned char *) buf);
  leave_handle (h);
  return err;
}

/* Upper bound of the pause before an async request runs: 2 ms, or
 * $FAKE_VDDK_ASYNC_DELAY_US (1 to 999999). */
static long
max_async_delay_us (void)
{
  const char *v = env_value ("FAKE_VDDK_ASYNC_DELAY_US");
  long us = v ? strtol (v, NULL, 10) : 2000;

  return us >= 1 && us <= 999999 ? us : 2000;
}

/* The random pause of one async request, in nanoseconds. */
static long
async_pause_ns (struct async_request *req)
{
  unsigned seed = (unsigned) (uintptr_t) req ^ (unsigned) req->sector;

  return (long) (rand_r (&seed) % max_async_delay_us ()) * 1000;
}

/* Do an async request, call its callback, and count it done. */
static void
complete_async (struct async_request *req)
{
  struct handle *h = req->h;
  VixError err;

  err = transfer (h, req->is_write, req->sector, req->count, req->buf);
  if (env_value ("FAKE_VDDK_RECORD_COMPLETIONS"))
    record ("Completed op=%s sector=%llu count=%llu thread=%lu",
            req->is_write ? "WriteAsync" : "ReadAsync",
            (unsigned long long) req->sector,
            (unsigned long long) req->count,
            (unsigned long) pthread_self ());
  if (req->done)
    req->done (req->data, err);
  free (req);

  pthread_mutex_lock (&h->lock);
  if (--h->pending == 0)
    pthread_cond_broadcast (&h->idle);
  pthread_mutex_unlock (&h->lock);
}

/* By default each async request runs on a thread of its own after a
 * short random pause, so completions come back out of order, as they
 * can with VDDK. */
static void *
run_async (void *arg)
{
  struct async_request *req = arg;
  struct timespec pause;

  pause.tv_sec = 0;
  pause.tv_nsec = async_pause_ns (req);
  nanosleep (&pause, NULL);
  complete_async (req);
  return NULL;
}

/* With $FAKE_VDDK_COMPLETION_THREADS=N (1 to 256), as real VDDK does
 * with the background threads it starts, N long-lived threads run the
 * requests instead, each when its pause (counted from the submit) is
 * over: the latency is the same, but callbacks come from a few threads
 * that live on, not from a new thread each time. */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER;
static struct async_request *pool_queue;
static pthread_t pool_ids[256];
static int pool_threads;
static int pool_stopping;

static int
completion_threads (void)
{
  const char *v = env_value ("FAKE_VDDK_COMPLETION_THREADS");
  long n = v ? strtol (v, NULL, 10) : 0;

  return n >= 1 && n <= 256 ? (int) n : 0;
}

static int
earlier (const struct timespec *a, const struct timespec *b)
{
  return a->tv_sec < b->tv_sec ||
    (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static void *
pool_worker (void *arg)
{
  struct timespec now;

  (void) arg;
  pthread_mutex_lock (&pool_lock);
  for (;;) {
    struct async_request *req = pool_queue;

    if (req == NULL) {
      if (pool_stopping)
        break;
      pthread_cond_wait (&pool_work, &pool_lock);
      continue;
    }
    clock_gettime (CLOCK_REALTIME, &now);
    if (earlier (&now, &req->due)) {
      pthread_cond_timedwait (&pool_work, &pool_lock, &req->due);
      continue;
    }
    pool_queue = req->next;
    if (pool_queue != NULL)
      pthread_cond_signal (&pool_work);  /* the next one may be due too */
    pthread_mutex_unlock (&pool_lock);
    complete_async (req);
    pthread_mutex_lock (&pool_lock);
  }
  pthread_mutex_unlock (&pool_lock);
  return NULL;
}

/* Exit, as VDDK's does with its background threads: the pool's threads
 * finish what is queued and end. */
static void
stop_pool (void)
{
  int i, n;

  pthread_mutex_lock (&pool_lock);
  pool_stopping = 1;
  pthread_cond_broadcast (&pool_work);
  n = pool_threads;
  pthread_mutex_unlock (&pool_lock);
  for (i = 0; i < n; i++)
    pthread_join (pool_ids[i], NULL);
  pthread_mutex_lock (&pool_lock);
  pool_threads = 0;
  pool_stopping = 0;
  pthread_mutex_unlock (&pool_lock);
}

/* Queue a request for the pool, starting its threads on first use (not
 * in InitEx: a test may fork after it). */
static int
pool_submit (struct async_request *req, int threads)
{
  struct async_request **at;
  long pause_ns = async_pause_ns (req);
  int r = 0;

  clock_gettime (CLOCK_REALTIME, &req->due);
  req->due.tv_nsec += pause_ns;
  if (req->due.tv_nsec >= 1000000000) {
    req->due.tv_sec += 1;
    req->due.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock (&pool_lock);
  while (pool_threads < threads && r == 0) {
    r = pthread_create (&pool_ids[pool_threads], NULL, pool_worker, NULL);
    if (r == 0)
      pool_threads++;
  }
  if (r == 0 || pool_threads > 0) {
    for (at = &pool_queue; *at && !earlier (&req->due, &(*at)->due);
         at = &(*at)->next)
      ;
    req->next = *at;
    *at = req;
    pthread_cond_signal (&pool_work);
    r = 0;
  }
  pthread_mutex_unlock (&pool_lock);
  return r;
}

static VixError
submit_async (struct handle *h, int is_write, uint64_t sector,
              uint64_t count, unsigned char *buf, CompletionFunc *done,
              void *data)
{
  struct async_request *req;
  pthread_attr_t attr;
  pthread_t thread;
  int threads = completion_threads ();
  int r;

  if (h == NULL || buf == NULL)
    return VIX_E_INVALID_ARG;
  req = malloc (sizeof *req);
  if (req == NULL)
    return VIX_E_FAIL;
  *req = (struct async_request) {
    .h = h, .is_write = is_write, .sector = sector, .count = count,
    .buf = buf, .done = done, .data = data,
  };

  pthread_mutex_lock (&h->lock);
  h->pending++;
  pthread_mutex_unlock (&h->lock);

  if (threads) {
    r = pool_submit (req, threads);
  }
  else {
    pthread_attr_init (&attr);
    pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
    r = pthread_create (&thread, &attr, run_async, req);
    pthread_attr_destroy (&attr);
  }
  if (r != 0) {
    free (req);
    pthread_mutex_lock (&h->lock);
    if (--h->pending == 0)
      pthread_cond_broadcast (&h->idle);
    pthread_mutex_unlock (&h->lock);
    return VIX_E_FAIL;
  }
  return VIX_ASYNC;
}

EXPORT VixError
VixDiskLib_ReadAsync (struct handle *h, uint64_t startSector,
                      uint64_t numSectors, uint8_t *buf,
                      CompletionFunc *done, void *data)
{
  VixError err;

  record ("ReadAsync sector=%llu count=%llu",
          (unsigned long long) startSector, (unsigned long long) numSectors);
  if (h == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "ReadAsync");
  err = submit_async (h, 0, startSector, numSectors, buf, done, data);
  leave_handle (h);
  return err;
}

EXPORT VixError
VixDiskLib_WriteAsync (struct handle *h, uint64_t startSector,
                       uint64_t numSectors, const uint8_t *buf,
                       CompletionFunc *done, void *data)
{
  VixError err;

  record ("WriteAsync sector=%llu count=%llu",
          (unsigned long long) startSector, (unsigned long long) numSectors);
  if (h == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "WriteAsync");
  err = submit_async (h, 1, startSector, numSectors, (unsigned char *) buf,
                      done, data);
  leave_handle (h);
  return err;
}

EXPORT VixError
VixDiskLib_Wait (struct handle *h)
{
  record ("Wait");
  if (h == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "Wait");
  wait_idle (h);
  leave_handle (h);
  return VIX_OK;
}

EXPORT VixError
VixDiskLib_Flush (struct handle *h)
{
  VixError err;

  record ("Flush");
  if (h == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "Flush");
  err = fdatasync (h->fd) == 0 || errno == EINVAL ? VIX_OK
                                                 : VIX_E_FILE_ERROR;
  leave_handle (h);
  return err;
}

EXPORT VixError
VixDiskLib_Create (struct connection *conn, const char *path,
                   const CreateParams *params, void *progressFunc,
                   void *progressData)
{
  char *params_hex;
  int fd;

  (void) progressFunc;
  (void) progressData;
  if (conn == NULL || path == NULL || params == NULL)
    return VIX_E_INVALID_ARG;
  params_hex = hex_of (params, sizeof *params);
  record ("Create path=%s params=%s diskType=%d adapterType=%d hwVersion=%u "
          "capacity=%llu", path, params_hex, params->diskType,
          params->adapterType, params->hwVersion,
          (unsigned long long) params->capacity);
  free (params_hex);
  LOG ("VixDiskLib: Create %s type %d capacity %llu sectors\n",
       path, params->diskType, (unsigned long long) params->capacity);

  /* Like VDDK, disks are only created on local connections. */
  if (conn->remote)
    return VIX_E_NOT_SUPPORTED;
  fd = open (path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd == -1)
    return errno == EEXIST ? VIX_E_FILE_ALREADY_EXISTS : VIX_E_FILE_ERROR;
  if (ftruncate (fd, params->capacity * SECTOR_SIZE) == -1) {
    close (fd);
    unlink (path);
    return VIX_E_FILE_ERROR;
  }
  close (fd);
  return VIX_OK;
}

/* ConnectParams handed out by AllocateConnectParams: FreeConnectParams
 * must not free(3) memory the caller allocated itself (a ctypes buffer),
 * so it warns about that instead of crashing the test. */
#define MAX_CONNECT_PARAMS 64
static ConnectParams *allocated_params[MAX_CONNECT_PARAMS];

static int
forget_connect_params (ConnectParams *params)
{
  int i, found = 0;

  pthread_mutex_lock (&state_lock);
  for (i = 0; i < MAX_CONNECT_PARAMS; i++)
    if (allocated_params[i] == params) {
      allocated_params[i] = NULL;
      found = 1;
      break;
    }
  pthread_mutex_unlock (&state_lock);
  return found;
}

/* Strings inside belong to the caller; only the structure is ours. */
EXPORT void
VixDiskLib_FreeConnectParams (ConnectParams *params)
{
  if (params == NULL)
    return;
  if (!forget_connect_params (params)) {
    WARN ("VixDiskLib: FreeConnectParams of memory it did not allocate\n");
    return;
  }
  count_outstanding (-1);
  free (params);
}

EXPORT const char *
VixDiskLib_ListTransportModes (void)
{
  return "file:san:hotadd:nbdssl:nbd";
}

/* ---- Optional functions of VDDK >= 6.7. */

#ifdef FAKE_VDDK_OPTIONAL

EXPORT ConnectParams *
VixDiskLib_AllocateConnectParams (void)
{
  ConnectParams *params = calloc (1, sizeof *params);
  int i;

  if (params == NULL)
    return NULL;
  pthread_mutex_lock (&state_lock);
  for (i = 0; i < MAX_CONNECT_PARAMS && allocated_params[i]; i++)
    ;
  if (i < MAX_CONNECT_PARAMS)
    allocated_params[i] = params;
  pthread_mutex_unlock (&state_lock);
  if (i == MAX_CONNECT_PARAMS) {
    free (params);
    return NULL;
  }
  count_outstanding (1);
  return params;
}

/* Append [start, start+length) sectors, merging with the last block. */
static int
add_block (BlockList **list, uint32_t *room, uint64_t start, uint64_t length)
{
  BlockList *l = *list;

  if (l->numBlocks > 0) {
    Block *last = &l->blocks[l->numBlocks - 1];
    if (last->offset + last->length >= start) {
      uint64_t end = start + length;
      if (end > last->offset + last->length)
        last->length = end - last->offset;
      return 0;
    }
  }
  if (l->numBlocks == *room) {
    *room *= 2;
    l = realloc (l, offsetof (BlockList, blocks) + *room * sizeof (Block));
    if (l == NULL)
      return -1;
    *list = l;
  }
  l->blocks[l->numBlocks].offset = start;
  l->blocks[l->numBlocks].length = length;
  l->numBlocks++;
  return 0;
}

static VixError
query_allocated_blocks (struct handle *h, uint64_t startSector,
                        uint64_t numSectors, uint64_t chunkSize,
                        BlockList **out)
{
  uint64_t end_sector = startSector + numSectors;
  off_t pos, data, hole, end;
  uint32_t room = 16;
  BlockList *list;

  record ("QueryAllocatedBlocks start=%llu count=%llu chunk=%llu",
          (unsigned long long) startSector, (unsigned long long) numSectors,
          (unsigned long long) chunkSize);
  if (h == NULL || out == NULL)
    return VIX_E_INVALID_ARG;
  if (chunkSize < MIN_CHUNK_SIZE || startSector % chunkSize != 0 ||
      numSectors % chunkSize != 0 ||
      numSectors / chunkSize > MAX_CHUNK_NUMBER ||
      end_sector > h->capacity) {
    LOG ("VixDiskLib: QueryAllocatedBlocks: bad range %llu+%llu "
         "chunk %llu (capacity %llu)\n",
         (unsigned long long) startSector, (unsigned long long) numSectors,
         (unsigned long long) chunkSize, (unsigned long long) h->capacity);
    return VIX_E_INVALID_ARG;
  }

  list = malloc (offsetof (BlockList, blocks) + room * sizeof (Block));
  if (list == NULL)
    return VIX_E_FAIL;
  list->numBlocks = 0;

  pos = startSector * SECTOR_SIZE;
  end = end_sector * SECTOR_SIZE;
  while (pos < end) {
    uint64_t first, last;

    data = lseek (h->fd, pos, SEEK_DATA);
    if (data == -1 && errno == ENXIO)
      break;                    /* only a hole is left */
    if (data == -1)
      data = pos;               /* no hole support: all of it is data */
    if (data >= end)
      break;
    hole = lseek (h->fd, data, SEEK_HOLE);
    if (hole == -1 || hole > end)
      hole = end;
    /* VDDK answers in whole chunks: round the data run out to them. */
    first = data / SECTOR_SIZE / chunkSize * chunkSize;
    last = (hole / SECTOR_SIZE + chunkSize - 1) / chunkSize * chunkSize;
    if (last > end_sector)
      last = end_sector;
    if (add_block (&list, &room, first, last - first) == -1)
      abort ();
    pos = hole;
  }

  count_outstanding (1);
  *out = list;
  return VIX_OK;
}

EXPORT VixError
VixDiskLib_QueryAllocatedBlocks (struct handle *h, uint64_t startSector,
                                 uint64_t numSectors, uint64_t chunkSize,
                                 BlockList **out)
{
  VixError err;

  if (h == NULL)
    return VIX_E_INVALID_ARG;
  enter_handle (h, "QueryAllocatedBlocks");
  err = query_allocated_blocks (h, startSector, numSectors, chunkSize, out);
  leave_handle (h);
  return err;
}

EXPORT VixError
VixDiskLib_FreeBlockList (BlockList *list)
{
  if (list == NULL)
    return VIX_E_INVALID_ARG;
  count_outstanding (-1);
  free (list);
  return VIX_OK;
}

#endif /* FAKE_VDDK_OPTIONAL */

/* ---- Test helpers, not part of VDDK. */

/* Objects handed out and not yet freed (error texts, infos, block lists,
 * connect params). */
EXPORT int
fake_vddk_outstanding (void)
{
  return outstanding;
}

/* The C compiler's layout of the structures above, "Struct.field=offset
 * size" per line, for the ABI test to compare with the document. */
#define FIELD(s, f, m) \
  "\n" #s "." f "=%zu %zu", offsetof (s, m), sizeof (((s *) 0)->m)
#define SIZE(s) "\n" #s "=%zu", sizeof (s)

EXPORT const char *
fake_vddk_layout (void)
{
  static char text[8192];
  char *p = text;
  size_t room = sizeof text;
  int n;

#define ADD(...) \
  do { \
    n = snprintf (p, room, __VA_ARGS__); \
    p += n; room -= n; \
  } while (0)

  ADD ("major=%d", FAKE_VDDK_MAJOR);
  ADD (SIZE (ConnectParams));
  ADD (FIELD (ConnectParams, "vmxSpec", vmxSpec));
  ADD (FIELD (ConnectParams, "serverName", serverName));
  ADD (FIELD (ConnectParams, "thumbPrint", thumbPrint));
  ADD (FIELD (ConnectParams, "reserved1", reserved1));
  ADD (FIELD (ConnectParams, "credType", credType));
  ADD (FIELD (ConnectParams, "creds.uid.userName", creds.uid.userName));
  ADD (FIELD (ConnectParams, "creds.uid.password", creds.uid.password));
  ADD (FIELD (ConnectParams, "creds.sessionId.cookie",
              creds.sessionId.cookie));
  ADD (FIELD (ConnectParams, "creds.sessionId.userName",
              creds.sessionId.userName));
  ADD (FIELD (ConnectParams, "creds.sessionId.key", creds.sessionId.key));
  ADD (FIELD (ConnectParams, "port", port));
  ADD (FIELD (ConnectParams, "nfcHostPort", nfcHostPort));
  ADD (FIELD (ConnectParams, "reserved3", reserved3));
  ADD (FIELD (ConnectParams, "reserved4", reserved4));
  ADD (FIELD (ConnectParams, "reserved5", reserved5));
  ADD (FIELD (ConnectParams, "spec.vStorageObjSpec",
              spec.vStorageObjSpec));
  ADD (FIELD (ConnectParams, "spec.vStorageObjSpec.id",
              spec.vStorageObjSpec.id));
  ADD (FIELD (ConnectParams, "spec.vStorageObjSpec.datastoreMoRef",
              spec.vStorageObjSpec.datastoreMoRef));
  ADD (FIELD (ConnectParams, "spec.vStorageObjSpec.ssId",
              spec.vStorageObjSpec.ssId));
  ADD (FIELD (ConnectParams, "specType", specType));
  ADD (SIZE (Info));
  ADD (FIELD (Info, "biosGeo", biosGeo));
  ADD (FIELD (Info, "biosGeo.cylinders", biosGeo.cylinders));
  ADD (FIELD (Info, "biosGeo.heads", biosGeo.heads));
  ADD (FIELD (Info, "biosGeo.sectors", biosGeo.sectors));
  ADD (FIELD (Info, "physGeo", physGeo));
  ADD (FIELD (Info, "physGeo.cylinders", physGeo.cylinders));
  ADD (FIELD (Info, "physGeo.heads", physGeo.heads));
  ADD (FIELD (Info, "physGeo.sectors", physGeo.sectors));
  ADD (FIELD (Info, "capacity", capacity));
  ADD (FIELD (Info, "adapterType", adapterType));
  ADD (FIELD (Info, "numLinks", numLinks));
  ADD (FIELD (Info, "parentFileNameHint", parentFileNameHint));
  ADD (FIELD (Info, "uuid", uuid));
  ADD (FIELD (Info, "logicalSectorSize", logicalSectorSize));
  ADD (FIELD (Info, "physicalSectorSize", physicalSectorSize));
  ADD (SIZE (Geometry));
  ADD (FIELD (Geometry, "cylinders", cylinders));
  ADD (FIELD (Geometry, "heads", heads));
  ADD (FIELD (Geometry, "sectors", sectors));
  ADD (SIZE (Block));
  ADD (FIELD (Block, "offset", offset));
  ADD (FIELD (Block, "length", length));
  ADD (FIELD (BlockList, "numBlocks", numBlocks));
  ADD (FIELD (BlockList, "blocks", blocks));
  ADD (FIELD (BlockList, "blocks.offset", blocks[0].offset));
  ADD (FIELD (BlockList, "blocks.length", blocks[0].length));
  ADD (SIZE (CreateParams));
  ADD (FIELD (CreateParams, "diskType", diskType));
  ADD (FIELD (CreateParams, "adapterType", adapterType));
  ADD (FIELD (CreateParams, "hwVersion", hwVersion));
  ADD (FIELD (CreateParams, "capacity", capacity));
  ADD (FIELD (CreateParams, "logicalSectorSize", logicalSectorSize));
  ADD (FIELD (CreateParams, "physicalSectorSize", physicalSectorSize));
#undef ADD
  return text;
}
