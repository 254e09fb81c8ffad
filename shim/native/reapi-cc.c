/* reapi-cc's native twin: the same job as shim/client.py, without starting
 * Python (about 8 ms a compile, more than a cached compile costs otherwise).
 *
 * The agent builds this file into $REAPI_HOME/shim/reapi-cc-native when it
 * starts, and the installed reapi-cc script runs it as
 *
 *     reapi-cc-native SCRIPT ARGS...      (SCRIPT: the script's $0)
 *
 * SCRIPT's name says how we were called: "reapi-cc" (ARGS start with the
 * compiler) or a masquerade symlink named like the compiler. The compile
 * goes to the agent in the request format of shim/protocol.py; a result is
 * written out with its exit status, and anything else (a "local" answer, an
 * agent that does not answer properly) runs the real compiler with the same
 * arguments. When there is no agent to ask, or the command is not one this
 * program handles, the Python client takes over (it starts the agent, prints
 * usage errors): the script is run again with REAPI_CC_NATIVE=0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

#define COMPILE_TIMEOUT_SECONDS 3600
#define MAX_MESSAGE (64u * 1024 * 1024)

struct buffer {
    char *data;
    size_t size, capacity;
};

/* Append n bytes; 0 on success, -1 when out of memory. */
static int append(struct buffer *b, const void *bytes, size_t n)
{
    if (b->size + n > b->capacity) {
        size_t capacity = b->capacity ? b->capacity : 65536;
        while (capacity < b->size + n)
            capacity *= 2;
        char *data = realloc(b->data, capacity);
        if (!data)
            return -1;
        b->data = data;
        b->capacity = capacity;
    }
    memcpy(b->data + b->size, bytes, n);
    b->size += n;
    return 0;
}

static int append_field(struct buffer *b, const char *field)
{
    return append(b, field, strlen(field) + 1); /* with its NUL */
}

static void put_u32(unsigned char *at, uint32_t value)
{
    at[0] = value >> 24;
    at[1] = value >> 16;
    at[2] = value >> 8;
    at[3] = value;
}

static uint32_t get_u32(const unsigned char *at)
{
    return (uint32_t)at[0] << 24 | (uint32_t)at[1] << 16 | (uint32_t)at[2] << 8 | at[3];
}

/* The compiler called `name`: a path as given, else the first executable on
 * PATH that is not this program's script (`me`, resolved). */
static char *find_compiler(const char *name, const char *me)
{
    if (strchr(name, '/'))
        return strdup(name);
    const char *path = getenv("PATH");
    if (!path)
        return NULL;
    char candidate[PATH_MAX], resolved[PATH_MAX];
    for (const char *start = path;; start++) {
        const char *end = strchrnul(start, ':');
        int length = (int)(end - start);
        if (length == 0)
            snprintf(candidate, sizeof candidate, "./%s", name);
        else
            snprintf(candidate, sizeof candidate, "%.*s/%s", length, start, name);
        struct stat st;
        if (stat(candidate, &st) == 0 && S_ISREG(st.st_mode) && access(candidate, X_OK) == 0
            && !(me && realpath(candidate, resolved) && strcmp(resolved, me) == 0))
            return strdup(candidate);
        if (!*end)
            return NULL;
        start = end;
    }
}

/* Run the script again in Python; returns only if that cannot be done. */
static void python_client(char **argv)
{
    setenv("REAPI_CC_NATIVE", "0", 1);
    argv[0] = "sh"; /* argv[1] is the script, the rest its arguments */
    execv("/bin/sh", argv);
}

static int run_locally(char **command)
{
    execv(command[0], command);
    fprintf(stderr, "reapi-cc: cannot run %s: %s\n", command[0], strerror(errno));
    return 127;
}

/* Write everything; to the agent's socket with send(), which must not raise
 * SIGPIPE if the agent went away (the compile then runs here). */
static int write_all(int fd, const char *data, size_t size, int socket)
{
    while (size) {
        ssize_t n = socket ? send(fd, data, size, MSG_NOSIGNAL) : write(fd, data, size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, char *data, size_t size)
{
    while (size) {
        ssize_t n = read(fd, data, size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

/* The agent's socket: $REAPI_HOME/shim/agent.sock, as shim/protocol.py. */
static int socket_address(struct sockaddr_un *address)
{
    const char *home = getenv("REAPI_HOME");
    const char *user_home = getenv("HOME");
    int n;
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    if (home && *home)
        n = snprintf(address->sun_path, sizeof address->sun_path, "%s/shim/agent.sock", home);
    else if (user_home)
        n = snprintf(address->sun_path, sizeof address->sun_path,
                     "%s/.cache/reapi/shim/agent.sock", user_home);
    else
        return -1;
    return n > 0 && (size_t)n < sizeof address->sun_path ? 0 : -1;
}

/* The request of shim/protocol.py: compile, directory, command, environment. */
static int compile_request(struct buffer *b, char **command, int count)
{
    char cwd[PATH_MAX], number[16];
    if (!getcwd(cwd, sizeof cwd))
        return -1;
    snprintf(number, sizeof number, "%d", count);
    int failed = append(b, "\0\0\0\0", 4) || append_field(b, "compile") || append_field(b, cwd)
                 || append_field(b, number);
    for (int i = 0; i < count && !failed; i++)
        failed = append_field(b, command[i]);
    for (char **entry = environ; *entry && !failed; entry++)
        failed = append_field(b, *entry);
    if (failed || b->size - 4 > MAX_MESSAGE)
        return -1;
    put_u32((unsigned char *)b->data, (uint32_t)(b->size - 4));
    return 0;
}

enum outcome { AGENT_ABSENT, LOCAL, RESULT };

/* Ask the agent; on RESULT, *reply holds the reply's body. */
static enum outcome ask_agent(struct buffer *request, struct buffer *reply)
{
    struct sockaddr_un address;
    if (socket_address(&address) < 0)
        return AGENT_ABSENT;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return LOCAL;
    struct timeval timeout = {.tv_sec = COMPILE_TIMEOUT_SECONDS};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        int absent = errno == ENOENT || errno == ECONNREFUSED;
        close(fd);
        return absent ? AGENT_ABSENT : LOCAL;
    }
    unsigned char header[4];
    enum outcome outcome = LOCAL;
    if (write_all(fd, request->data, request->size, 1) == 0
        && read_all(fd, (char *)header, 4) == 0) {
        uint32_t length = get_u32(header);
        if (length <= MAX_MESSAGE && (reply->data = malloc(length ? length : 1))
            && read_all(fd, reply->data, length) == 0) {
            reply->size = length;
            outcome = RESULT;
        }
    }
    close(fd);
    return outcome;
}

/* Write out an "X" reply and return its exit status; -1 if it is not one. */
static int deliver(const struct buffer *reply)
{
    const unsigned char *body = (const unsigned char *)reply->data;
    if (reply->size < 9 || body[0] != 'X')
        return -1;
    int32_t code = (int32_t)get_u32(body + 1);
    uint32_t stdout_size = get_u32(body + 5);
    if (stdout_size > reply->size - 9)
        return -1;
    const char *out = reply->data + 9;
    if (write_all(1, out, stdout_size, 0) < 0
        || write_all(2, out + stdout_size, reply->size - 9 - stdout_size, 0) < 0)
        return 1;
    return code & 0xff;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    char *me = realpath(argv[1], NULL);
    const char *invoked = strrchr(argv[1], '/') ? strrchr(argv[1], '/') + 1 : argv[1];
    char **rest = argv + 2;
    int count = argc - 2;
    const char *name = invoked;
    if (strncmp(invoked, "reapi-cc", 8) == 0) {
        if (count == 0 || rest[0][0] == '-') {
            python_client(argv); /* usage, --stats, --zero-stats */
            return 2;
        }
        name = rest[0];
        rest++;
        count--;
    }
    char *compiler = find_compiler(name, me);
    if (!compiler) {
        python_client(argv); /* it says what was not found */
        return 2;
    }
    char **command = calloc((size_t)count + 2, sizeof *command); /* [compiler, args...] */
    if (!command)
        return 2;
    command[0] = compiler;
    memcpy(command + 1, rest, (size_t)count * sizeof *command);
    count++;
    const char *disable = getenv("REAPI_CC_DISABLE");
    if (disable && strcmp(disable, "1") == 0)
        return run_locally(command);

    struct buffer request = {0}, reply = {0};
    if (compile_request(&request, command, count) < 0)
        return run_locally(command);
    switch (ask_agent(&request, &reply)) {
    case AGENT_ABSENT:
        python_client(argv);
        return run_locally(command);
    case RESULT: {
        int status = deliver(&reply);
        if (status >= 0)
            return status;
        return run_locally(command);
    }
    default:
        return run_locally(command);
    }
}
